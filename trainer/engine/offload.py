"""The frozen encoders off the GPU while a run trains.

Once every latent and caption a run can draw is cached, the VAE and the text encoders have nothing
to do until the next validation render: they leave the GPU (SDXL: 1.7 GiB, SD3 with T5: 10 GiB
in bf16), come back for the render, and leave again. A module whose outputs are not all cached
(random crops, a trained text encoder) stays where it is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

log = logging.getLogger("finetune")


class Parking:
    """Moves a set of frozen modules between the training device and the CPU.

    Args:
        modules: name -> module (e.g. ``{"vae": …, "text_encoder_0": …}``).
        device: the training device (where the modules are when borrowed).
        on_move: called after every move (the loop reports its GPU memory to the host there).
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        device: torch.device,
        *,
        on_move: Callable[[], None] | None = None,
    ):
        self.modules = modules
        self.device = device
        self.on_move = on_move
        self.parked = False
        self.moves: list[tuple[str, str]] = []  # (what, where), for logs and tests

    def _move(self, where: torch.device | str) -> None:
        for name, module in self.modules.items():
            module.to(device=where)
            self.moves.append((name, str(where)))
        if torch.device(where).type == "cpu" and self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed blocks back, so the host can use them
        if self.on_move is not None:
            self.on_move()

    def park(self) -> None:
        """Move the modules to the CPU (no-op if parked, or nothing to park)."""
        if self.parked or not self.modules:
            return
        self._move("cpu")
        self.parked = True
        log.info("finetune: %s left the GPU until the next validation render", ", ".join(self.modules))

    @contextlib.contextmanager
    def borrowed(self) -> Iterator[None]:
        """The modules on the training device for the block, parked again after it (if they were)."""
        if not self.parked:
            yield
            return
        self._move(self.device)
        self.parked = False
        try:
            yield
        finally:
            self.park()


def frozen_to_park(bundle, *, latents_cached: bool, text_cached: bool) -> dict[str, nn.Module]:
    """The frozen modules a run can do without between validation renders, by name."""
    out: dict[str, nn.Module] = {}
    if latents_cached:
        out["vae"] = bundle.vae
    if text_cached:
        for i, te in enumerate(bundle.text_encoders):
            if te is not None:
                out[f"text_encoder_{i}"] = te
    return out
