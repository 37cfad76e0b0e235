"""The torch device a model runs on, from ``--device`` or the Python API."""

from __future__ import annotations

from .errors import FuseError


def resolve_device(device):
    """``None``/"auto" -> cuda if available else cpu; anything else must be a device this machine has."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise FuseError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FuseError(f"--device {device}: CUDA is not available on this machine (torch "
                        f"{torch.__version__}{', a CPU-only build' if torch.version.cuda is None else ''})")
    if dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as e:  # no such backend / index, driver error: torch raises several types
            raise FuseError(f"--device {device}: not usable on this machine ({str(e).splitlines()[0][:150]})") from None
    return dev


__all__ = ["resolve_device"]
