"""Provisioning kits: one command makes a federation's keys and certificates and sorts
them into one folder per machine, as NVFlare's startup kits do.

``fedapp provision --sites N --server-address HOST:PORT --out DIR`` writes::

    DIR/server/                       public material, and the server's own TLS key
        kit.json                      role, address, sites, modes
        certs/ca.crt, server.pem, server.key (0600)
        supernodes/site-0.pub ...     the sites' SuperNode public keys, to register
        paillier.pub.json             (paillier mode) the key the ServerApp encrypts with
        paillier-threshold.pub.json   (paillier-threshold mode)
    DIR/site-I/                       exactly what client node I needs
        kit.json                      role, address, partition I of N
        certs/ca.crt
        supernode.key (0600), supernode.pub
        paillier.key.json (0600)      (paillier mode) the federation's private key
        secagg-identity.key (0600), secagg-identity.pub, secagg-roster.json  (masking,
                                      threshold Paillier)
        paillier-threshold.pub.json, paillier-threshold-share-<I+1>.json (0600),
        paillier-group.key (0600)     (paillier-threshold mode, on request: --modes)

then ``fedapp server --kit DIR/server``, ``fedapp client --kit DIR/site-I`` on each
site and ``fedapp run --kit DIR/server`` take everything from there.

The machine that runs ``provision`` is the dealer: it makes every site's private keys
(and the Paillier private key all sites share, or the threshold key's shares and the
sites' group key) and must delete ``DIR`` once each folder
is on its machine. The CA's private key is never written, so no further certificate can
be issued from this CA. A folder holds no other site's private key, and the server's
folder none at all but its TLS key.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from strategies.keyfiles import (GROUP_KEY_NAME, IDENTITY_NAME, PRIVATE_NAME, PUBLIC_NAME,
                                 ROSTER_NAME, THRESHOLD_PUBLIC_NAME, check_private,
                                 read_public_identity, threshold_share_name, write_identity,
                                 write_roster, write_secret, write_threshold_key)
from strategies.paillier import generate_keypair

from .certificates import DEFAULT_HOSTS, make_certificates
from .modes import MODES as _REGISTRY
from .nodekeys import write_node_keypair

KIT_FILE = "kit.json"
MODES = tuple(_REGISTRY)  # the aggregation modes
# made unless --modes says otherwise (a threshold key takes safe primes: on request)
DEFAULT_MODES = ("fedavg", "paillier", "secagg")
SUPERNODE_PRIVATE = "supernode.key"


class KitError(ValueError):
    """A kit folder that is not what the command needs."""


@dataclass(frozen=True)
class Kit:
    """One machine's kit, read from its ``kit.json``.

    Parameters
    ----------
    directory : Path
        The kit folder.
    role : str
        ``"server"`` or ``"site"``.
    superlink : str
        ``HOST:PORT`` of the server, as the sites reach it.
    modes : tuple of str
        The aggregation modes the kit holds keys for.
    partition_id, num_partitions : int
        A site's partition of the data (-1 and the number of sites for the server).
    """

    directory: Path
    role: str
    superlink: str
    modes: tuple[str, ...]
    partition_id: int
    num_partitions: int

    @property
    def certificates(self) -> Path:
        return self.directory / "certs"

    @property
    def port(self) -> int:
        return int(self.superlink.rsplit(":", 1)[1])

    def file(self, name: str) -> Path | None:
        """``name`` in the kit, or None if the kit has none."""
        path = self.directory / name
        return path if path.is_file() else None

    def supernode_keys(self) -> list[Path]:
        """The sites' SuperNode public keys (server kit)."""
        return sorted((self.directory / "supernodes").glob("*.pub"))


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise KitError(f"server address {address!r}: give HOST:PORT, e.g. "
                       "server.example.org:9092")
    return host.strip("[]"), int(port)


def _write_kit_file(directory: Path, **fields: object) -> None:
    (directory / KIT_FILE).write_text(json.dumps(fields, indent=2) + "\n")


def provision(out: Path, sites: int, server_address: str,
              modes: tuple[str, ...] = DEFAULT_MODES, days: int = 365,
              threshold: int = 2) -> list[Path]:
    """Make a federation's kits in ``out`` (see the module); returns their folders,
    the server's first.

    Raises
    ------
    KitError
        If ``out`` exists and is not empty, fewer than 2 sites are asked for, a mode is
        unknown, the address is not ``HOST:PORT``, or (``paillier-threshold``) fewer than
        ``threshold + 1`` sites would contribute.

    With ``paillier-threshold`` each site holds one share of a ``threshold``-of-``sites``
    key (site I share I + 1) and the group key.
    """
    host, _ = _split_address(server_address)
    if sites < 2:
        raise KitError(f"--sites {sites}: a federation needs at least 2 sites")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise KitError(f"unknown mode(s) {unknown}: choose from {list(MODES)}")
    if out.exists() and any(out.iterdir()):
        raise KitError(f"{out} exists and is not empty: give a new directory")
    dealt = "paillier-threshold" in modes
    if dealt and not 2 <= threshold < sites:
        raise KitError(f"--threshold {threshold} with {sites} sites: a threshold key needs "
                       "2 <= T < sites (rounds need T + 1 contributors)")
    names = [f"site-{i}" for i in range(sites)]
    server = out / "server"
    make_certificates(server / "certs", [host, *[h for h in DEFAULT_HOSTS if h != host]],
                      days)
    paillier = generate_keypair(2048) if "paillier" in modes else None
    if paillier:
        (server / PUBLIC_NAME).write_text(json.dumps(paillier[0].to_dict()))
    if dealt:  # dealt into a scratch folder of the dealer's, then sorted out and removed
        dealer = out / ".dealer"
        write_threshold_key(dealer, threshold, sites)
        shutil.copyfile(dealer / THRESHOLD_PUBLIC_NAME, server / THRESHOLD_PUBLIC_NAME)
    identities = []
    for i, name in enumerate(names):
        site = out / name
        (site / "certs").mkdir(parents=True)
        shutil.copyfile(server / "certs" / "ca.crt", site / "certs" / "ca.crt")
        public, _ = write_node_keypair(site)
        (server / "supernodes").mkdir(exist_ok=True)
        shutil.copyfile(public, server / "supernodes" / f"{name}.pub")
        if paillier:
            write_secret(site / PRIVATE_NAME, json.dumps(paillier[1].to_dict()))
        if dealt:
            for src, dst in ((THRESHOLD_PUBLIC_NAME, THRESHOLD_PUBLIC_NAME),
                             (GROUP_KEY_NAME, GROUP_KEY_NAME),
                             (threshold_share_name(i + 1), threshold_share_name(i + 1))):
                shutil.copy2(dealer / src, site / dst)  # keeps 0600
        if "secagg" in modes or dealt:
            identities.append(read_public_identity(write_identity(site)[0]))
        _write_kit_file(site, role="site", superlink=server_address, modes=list(modes),
                        **{"partition-id": i, "num-partitions": sites})
    if dealt:
        shutil.rmtree(dealer)
    if identities:
        for name in names:
            write_roster(out / name / ROSTER_NAME, identities)
    _write_kit_file(server, role="server", superlink=server_address, modes=list(modes),
                    sites=names)
    return [server, *(out / n for n in names)]


def load_kit(directory: Path, role: str) -> Kit:
    """The kit in ``directory`` for a ``role`` (``"server"`` or ``"site"``) command,
    with its private key files checked (present, not readable by others).

    Raises
    ------
    KitError
        If there is no kit there, it is the other role's, or a file it lists is missing.
    """
    path = directory.expanduser() / KIT_FILE
    try:
        fields = json.loads(path.read_text())
        kit = Kit(directory.expanduser().resolve(), str(fields["role"]),
                  str(fields["superlink"]), tuple(fields["modes"]),
                  int(fields.get("partition-id", -1)),
                  int(fields.get("num-partitions", len(fields.get("sites", [])))))
    except FileNotFoundError:
        raise KitError(f"no {KIT_FILE} in {directory}: give a folder 'fedapp provision' "
                       "made") from None
    except (ValueError, KeyError, TypeError) as err:
        raise KitError(f"{path} is not a kit file ({err})") from None
    if kit.role != role:
        other = "fedapp client --kit" if kit.role == "site" else "fedapp server/run --kit"
        raise KitError(f"{directory} is a {kit.role} kit: it goes with '{other}'")
    _split_address(kit.superlink)
    needed = ["certs/ca.crt"]
    if role == "server":
        needed += ["certs/server.pem", "certs/server.key"]
        needed += [PUBLIC_NAME] if "paillier" in kit.modes else []
        needed += [THRESHOLD_PUBLIC_NAME] if "paillier-threshold" in kit.modes else []
    else:
        needed += [SUPERNODE_PRIVATE]
        needed += [PRIVATE_NAME] if "paillier" in kit.modes else []
        needed += [IDENTITY_NAME, ROSTER_NAME] if {"secagg", "paillier-threshold"} & set(
            kit.modes) else []
        needed += [THRESHOLD_PUBLIC_NAME, GROUP_KEY_NAME, threshold_share_name(
            kit.partition_id + 1)] if "paillier-threshold" in kit.modes else []
    missing = [n for n in needed if kit.file(n) is None]
    if missing:
        raise KitError(f"the kit in {directory} lacks {', '.join(missing)}: copy the whole "
                       "folder 'fedapp provision' made")
    for name in ("certs/server.key", SUPERNODE_PRIVATE, PRIVATE_NAME, IDENTITY_NAME,
                 GROUP_KEY_NAME, threshold_share_name(kit.partition_id + 1)):
        if (found := kit.file(name)) is not None:
            check_private(found)
    if role == "server" and not kit.supernode_keys():
        raise KitError(f"the kit in {directory} lists no SuperNode public keys (supernodes/)")
    return kit

