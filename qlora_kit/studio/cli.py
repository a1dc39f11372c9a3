"""`qlora-kit studio` (`python -m qlora_kit.studio`): the page on http://127.0.0.1:7860, opened in the browser.

Safe by default: it binds the loopback address; another address needs --auth USER:PASSWORD, because anyone who reaches
the page can run training commands and read the workspace. No share tunnel, no analytics, no web fonts or CDN: the
page works offline. Options and these checks are answered before Gradio is imported.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from qlora_kit.errors import UserError, print_user_error

DEFAULT_PORT = 7860


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from qlora_kit.cli import command_name

    parser = argparse.ArgumentParser(
        prog=command_name("python -m qlora_kit.studio"),
        description="The whole fine-tuning run in a browser: model, data, settings and fit, training with live "
                    "charts, results, chat, export. Every action runs the same qlora-kit commands.",
        epilog="needs the studio extra: pip install -e \".[studio]\"")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, this machine only; another needs --auth)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--root", default=".",
                        help="workspace folder: the page reads and writes only here (and in the model caches); "
                             "default the current folder")
    parser.add_argument("--auth", metavar="USER:PASSWORD", help="require this login (needed off the loopback address)")
    parser.add_argument("--no-browser", action="store_true", help="do not open the browser")
    parser.add_argument("--max-upload-mb", type=int, default=200, metavar="MB",
                        help="largest data file the page accepts (default 200)")
    return parser.parse_args(argv)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_options(args: argparse.Namespace) -> tuple[str, str] | None:
    """(user, password) from --auth, after refusing what would be unsafe or cannot work."""
    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise UserError(f"--auth {args.auth!r} is not USER:PASSWORD.", hint="e.g. --auth alice:a-long-password")
        auth = (user, password)
    if not is_loopback(args.host) and auth is None:
        raise UserError(f"--host {args.host} would open the studio to other machines without a login.",
                        ["anyone who reaches the page can start training commands and read files in the workspace"],
                        hint="Add --auth USER:PASSWORD, or leave out --host to stay on 127.0.0.1 (this machine).")
    root = Path(args.root).expanduser()
    if not root.is_dir():
        raise UserError(f"--root {args.root}: no such folder.", hint="Create it, or point --root at a folder.")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port number (1-65535).")
    if args.max_upload_mb < 1:
        raise UserError("--max-upload-mb must be at least 1.")
    return auth


def quiet_environment(root: Path) -> None:
    """Before Gradio is imported: no analytics or version check, no hub telemetry, uploads in the workspace, no run
    history in the browser."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["GRADIO_TEMP_DIR"] = str(root / ".studio" / "uploads")
    # Gradio 6 keeps every event's inputs in the browser's localStorage ("run history"), the Make data screen's API
    # key among them, unless told not to (launch's run_history=False below; this for any other way it starts).
    os.environ["GRADIO_RUN_HISTORY"] = "False"


QUEUE_IDLE_POLL_S = 0.02
QUEUE_PROGRESS_POLL_S = 0.1


def calm_queue(page) -> None:
    """Gradio's event queue looks for work every 1 ms when it has none (and for progress every 10 ms): about 0.045
    of a core for as long as the studio is open, even with no tab, taken from the training it watches. With 20 ms and
    100 ms, still below what a click notices, the studio's CPU while a demo run trained with its tab closed went from
    1.0 to 0.26 CPU-s (`python -m qlora_kit.studio.measure`, docs/studio.md). These are attributes of Gradio's Queue,
    not options: tests/test_studio_form.py fails if a Gradio version stops reading them."""
    queue = page._queue
    queue.sleep_when_free = QUEUE_IDLE_POLL_S
    queue.progress_update_sleep_when_free = QUEUE_PROGRESS_POLL_S


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        auth = check_options(args)
        from qlora_kit.studio.workspace import Workspace

        ws = Workspace(Path(args.root), upload_limit_mb=args.max_upload_mb)
        quiet_environment(ws.root)
        try:
            import gradio  # noqa: F401
        except ImportError:
            raise UserError("The studio needs Gradio, which is not installed.",
                            hint='pip install -e ".[studio]"   (or: pip install "gradio>=6,<7")') from None
        from qlora_kit.studio.app import CSS, build

        page = build(ws)
        url = f"http://{args.host}:{args.port}"
        print(f"qlora_kit studio on {url} (workspace {ws.root}); Ctrl-C closes the page, trainings go on.",
              flush=True)
        calm_queue(page.queue())
        page.launch(server_name=args.host, server_port=args.port, auth=auth, share=False,
                    inbrowser=not args.no_browser, max_file_size=f"{args.max_upload_mb}mb",
                    allowed_paths=[str(ws.root)], show_error=True, quiet=True, css=CSS, footer_links=[],
                    mcp_server=False, ssr_mode=False, pwa=False, enable_monitoring=False, run_history=False)
    except UserError as error:
        print_user_error(error)
        return error.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
