"""Importing noisy or optional libraries quietly: transformers' model classes (which import torchao when it is
installed) and the optional extras (torchao, bitsandbytes), refused in one line when they cannot load."""

from __future__ import annotations

import contextlib
import importlib
import logging

from .errors import UserError


# Loggers of libraries that talk while they are imported, about nothing a tokenbooth user can act on:
# - torchao, torch.utils._pytree: transformers' modeling_utils imports torchao whenever it is installed, and a
#   torchao built for another torch logs the optional kernels it cannot load and torch's register_constant
#   deprecation, once per process; tokenbooth never uses torchao through transformers.
# - kernels, bitsandbytes: peft imports bitsandbytes, which on a CPU with AVX512-BF16 fetches a CPU kernel from
#   the Hub through `kernels`; with HF_HUB_OFFLINE=1 `kernels` logs "Skipping publisher trust check for
#   'kernels-community/quantization-bitsandbytes'...", and bitsandbytes notes optional kernels it cannot load.
IMPORT_CHATTER = ("torchao", "torch.utils._pytree", "kernels", "bitsandbytes")


@contextlib.contextmanager
def quiet_imports():
    """For importing transformers' model classes, peft and the optional extras: their import-time notes
    (IMPORT_CHATTER) are dropped; errors still show."""
    loggers = [logging.getLogger(name) for name in IMPORT_CHATTER]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def require_optional(module: str, what: str) -> None:
    """Imports the optional library `module` that `what` (a flag, as the user typed it) needs, or refuses in
    one line saying how to install it."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # notes about optional CPU kernels at import
    try:
        with quiet_imports():
            importlib.import_module(module)
    except Exception as e:  # a missing package, or one built for another platform
        raise UserError(f"{what} needs {module}, which cannot be imported here ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); pip install {module}") from None
