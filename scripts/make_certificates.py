"""Make a test CA and a server certificate for a TLS deployment (SuperLink).

    python scripts/make_certificates.py OUT_DIR [--host 127.0.0.1 --host server.example]

Writes OUT_DIR/ca.crt (give it to every client node), OUT_DIR/server.pem and
OUT_DIR/server.key (mode 0600, for the server only; refused by ``fedapp server``
when others can read it). OUT_DIR inside a Flower app is refused (the app's files
travel to the server in its bundle; ``fedapp run`` refuses an app holding a key). Existing files are never overwritten. The CA's private
key is not kept. For tests and trials: a production deployment uses certificates
from the organisation's own CA.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fedapp.bundle import refuse_inside_app  # noqa: E402
from fedapp.certificates import DEFAULT_HOSTS, make_certificates  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--host", action="append", help="name or IP the server is reached by "
                   "(repeatable; default 127.0.0.1 and localhost)")
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--allow-inside-app", action="store_true", help="write into a Flower "
                   "app's directory all the same (fedapp sim/run refuse to submit an app "
                   "holding server.key)")
    args = p.parse_args()
    try:
        if not args.allow_inside_app:
            refuse_inside_app(args.out, "the server's TLS key")
        make_certificates(args.out, args.host or DEFAULT_HOSTS, args.days)
    except (FileExistsError, ValueError) as err:
        raise SystemExit(f"make_certificates: {err}") from None
    print(f"wrote {args.out}/ca.crt, server.pem, server.key")


if __name__ == "__main__":
    main()
