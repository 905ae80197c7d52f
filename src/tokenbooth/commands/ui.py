"""`tokenbooth ui`: the web app (tokenbooth/ui/), served on this machine only unless told otherwise."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..backbones.families import DEFAULT_MODEL
from ..errors import UserError

DEFAULT_WORKSPACE = Path("tokenbooth-workspace")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "ui", help="the web app: upload photos, watch it learn, draw the subject (needs tokenbooth[ui])",
        description="Serve tokenbooth's web app: Personalize (upload 1-10 pictures, train with live progress), "
                    "Generate (draw a trained subject or the base model) and Subjects (the adapters in the "
                    "workspace). Open the printed address in a browser.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"the backbone selected by default (default: {DEFAULT_MODEL}). mini is always offered; "
                        "published models (lumina-mgpt-7b-512|768|1024, janus-pro-1b|7b, emu3-gen) are offered when "
                        "their files are in the Hugging Face cache; a model folder path is added to the list")
    p.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE,
                   help=f"folder for subjects (adapter folders: subjects/NAME, also readable by `tokenbooth "
                        f"generate --adapter`), generated images and zips; created if missing; one server per "
                        f"workspace (a second refuses) (default: ./{DEFAULT_WORKSPACE})")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens the app to "
                        "your network, without a password)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    p.add_argument("--share", action="store_true",
                   help="also open a public gradio.live link through Gradio's relay: anyone with the link can "
                        "use the app and its workspace (off by default)")
    p.set_defaults(run=run)
    return p


def run(args) -> None:
    # Gradio is an optional extra (tokenbooth[ui]), and the web app imports it at load: both imports wait until
    # the app is asked for, so `tokenbooth --help` and every other command work without it.
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError("the web app needs Gradio: pip install 'tokenbooth[ui]'") from None
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1-65535 (got {args.port})")
    from ..ui.app import launch

    launch(args.workspace, model=args.model, host=args.host, port=args.port, share=args.share)
