"""Key files: Paillier key pairs and threshold key shares (JSON), the masking nodes'
identity keys (PEM) and the roster of their public keys (JSON). Secret files are written with mode 0600 and
refused when other users can read them. The server only ever loads a Paillier public
key file.

Keys live in a key directory outside any Flower app: ``$FEDAPP_KEY_DIR``, else
``~/.fedapp/keys`` (:func:`default_key_dir`). ``flwr run`` packs an app's files
(every ``.json`` included) into the bundle it uploads to the SuperLink, so a key
kept in the app directory would travel to the server. Client nodes look for their
keys there too (:func:`node_key_file`), unless their node config names a file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .paillier import PrivateKey, PublicKey, generate_keypair
from .secagg_identity import Identity, IdentityError, Roster
from .threshold_paillier import KeyShare, ThresholdPublicKey, deal_threshold_key

if TYPE_CHECKING:  # threshold_protocol imports node_errors, which imports this module
    from .threshold_protocol import GroupKey

PUBLIC_NAME, PRIVATE_NAME = "paillier.pub.json", "paillier.key.json"
THRESHOLD_PUBLIC_NAME = "paillier-threshold.pub.json"
GROUP_KEY_NAME = "paillier-group.key"
IDENTITY_NAME, IDENTITY_PUBLIC_NAME = "secagg-identity.key", "secagg-identity.pub"
ROSTER_NAME = "secagg-roster.json"
KEY_DIR_ENV = "FEDAPP_KEY_DIR"
KEY_DIR_NODE_CONFIG = "key-dir"


class KeyNotFound(FileNotFoundError):
    """A client node holds no key file where it was told to look (the message says
    where it looked and how to fix it; it names no secret)."""


def default_key_dir() -> Path:
    """``$FEDAPP_KEY_DIR``, else ``~/.fedapp/keys``: where ``fedapp keygen`` writes keys
    and client nodes look for them. Never inside an app directory (see the module)."""
    return Path(os.environ.get(KEY_DIR_ENV) or Path.home() / ".fedapp" / "keys").expanduser()


def node_key_file(node_config: dict, config_key: str, file_name: str, keygen: str) -> Path:
    """The key file a client node uses: ``node_config[config_key]`` if given, else
    ``file_name`` in the node's key directory (node config ``key-dir``, else
    :func:`default_key_dir`).

    Raises
    ------
    KeyNotFound
        If that file does not exist, saying where the node looked and how to give it
        the key.
    """
    explicit = node_config.get(config_key)
    if explicit:
        path = Path(str(explicit)).expanduser()
    else:
        directory = node_config.get(KEY_DIR_NODE_CONFIG) or default_key_dir()
        path = Path(str(directory)).expanduser() / file_name
    if not path.is_file():
        raise KeyNotFound(
            f"no {file_name} on this node (looked for {path}): make it with '{keygen}' "
            f"(it writes to ${KEY_DIR_ENV} or ~/.fedapp/keys), or start the SuperNode with "
            f"--node-config \"{config_key}='PATH'\". In a simulation the nodes run in the "
            f"SuperLink's processes, which read ${KEY_DIR_ENV} when the SuperLink starts: "
            "set it before then (fedapp sim does), or keep the keys in ~/.fedapp/keys")
    return path


def write_secret(path: Path, text: str) -> None:
    """Write ``text`` to a new file readable by its owner only (mode 0600).

    Raises
    ------
    FileExistsError
        If ``path`` exists: a secret is never overwritten (nor its mode kept).
    """
    if path.exists():
        raise FileExistsError(f"{path} exists: remove it first or choose another directory")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def public_key_kind(path: Path) -> tuple[str, str] | None:
    """What public key ``path`` holds, if it holds one of ours, and the name of the
    private key that goes with it; else None."""
    try:
        head = Path(path).read_bytes()[:4096].decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if '"paillier-public-key"' in head:
        return "a Paillier public key", PRIVATE_NAME
    if '"fedapp-threshold-paillier-public-key"' in head[:200]:
        return "a threshold Paillier public key", "paillier-threshold-share-<i>.json"
    if head.startswith("-----BEGIN PUBLIC KEY-----") or (
            len(head) == 64 and all(c in "0123456789abcdef" for c in head.lower())):
        return "a masking identity public key", "secagg-identity.key"
    if head.startswith(("ecdsa-sha2-", "ssh-")):
        return "an OpenSSH (SuperNode) public key", "supernode.key"
    return None


def check_private(path: Path) -> None:
    """Refuse a secret file that group or others may read, write or execute, and a
    public key given where the private one is wanted (said first: no chmod fixes that).

    Raises
    ------
    ValueError
        If the file holds a public key.
    PermissionError
        With the ``chmod`` command that fixes it.
    """
    public = public_key_kind(path)
    if public is not None:
        raise ValueError(f"{path} holds {public[0]}, where a private key is needed: give its "
                         f"private half ({public[1]} from the same fedapp keygen), which "
                         "stays on this node")
    mode = Path(path).stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PermissionError(f"{path} is readable by other users (mode {oct(mode & 0o777)}): "
                              f"run 'chmod 600 {path}'")


def write_keypair(directory: Path, n_bits: int = 2048) -> tuple[Path, Path, str]:
    """Generate a key pair into ``directory``; returns (public, private, fingerprint).

    Refuses to overwrite an existing private key.
    """
    directory.mkdir(parents=True, exist_ok=True)
    public_path, private_path = directory / PUBLIC_NAME, directory / PRIVATE_NAME
    if private_path.exists():
        raise FileExistsError(f"{private_path} exists: remove it first or choose another directory")
    public_key, private_key = generate_keypair(n_bits)
    write_secret(private_path, json.dumps(private_key.to_dict()))
    public_path.write_text(json.dumps(public_key.to_dict()))
    return public_path, private_path, public_key.fingerprint


def _read(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as err:  # RecursionError: too deep JSON
        raise ValueError(f"cannot read a key from {path}: {err} (see 'fedapp keygen')") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds JSON {type(data).__name__}, not a key object "
                         "(see 'fedapp keygen')")
    return data


def load_public_key(path: Path) -> PublicKey:
    """A public key file; a private key file is refused (it fails the public key's
    format check), so a server cannot be handed one by mistake."""
    data = _read(path)
    if "p" in data or "q" in data:
        raise ValueError(f"{path} holds private key material: give the server the public key")
    return PublicKey.from_dict(data)


def load_private_key(path: Path) -> PrivateKey:
    """A private key file, refused if group or others may read it (chmod 600 it)."""
    check_private(path)
    return PrivateKey.from_dict(_read(path))


def threshold_share_name(index: int) -> str:
    """File name of key share ``index`` (1 to N)."""
    return f"paillier-threshold-share-{index}.json"


def write_threshold_key(directory: Path, threshold: int, shares: int, n_bits: int = 2048
                        ) -> tuple[Path, list[Path], str]:
    """Deal a ``threshold``-of-``shares`` Paillier key (:mod:`.threshold_paillier`) into
    ``directory``: the public key (for the server and every node), one share file per
    holder (mode 0600) and the clients' group key (``paillier-group.key``, 0600: every
    client, never the server). This process is the dealer: the secret exists only in memory
    here. Returns ``(public path, share paths, fingerprint)``; refuses to overwrite."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / threshold_share_name(i) for i in range(1, shares + 1)]
    for path in (directory / THRESHOLD_PUBLIC_NAME, *paths):
        if path.exists():
            raise FileExistsError(f"{path} exists: remove it first or choose another "
                                  "directory")
    if (directory / GROUP_KEY_NAME).exists():
        raise FileExistsError(f"{directory / GROUP_KEY_NAME} exists: remove it first or "
                              "choose another directory")
    from .threshold_protocol import GroupKey

    public, key_shares = deal_threshold_key(threshold, shares, n_bits)
    for path, share in zip(paths, key_shares, strict=True):
        write_secret(path, json.dumps(share.to_dict()))
    write_secret(directory / GROUP_KEY_NAME, json.dumps(GroupKey.generate(
        public.fingerprint).to_dict()))
    (directory / THRESHOLD_PUBLIC_NAME).write_text(json.dumps(public.to_dict()))
    return directory / THRESHOLD_PUBLIC_NAME, paths, public.fingerprint


def load_group_key(path: Path, public: ThresholdPublicKey | None = None) -> GroupKey:
    """The clients' group key file (:class:`.threshold_protocol.GroupKey`), refused if
    others may read it, if malformed, or (given ``public``) if made for another key."""
    from .threshold_protocol import GroupKey

    check_private(path)
    try:
        key = GroupKey.from_dict(_read(path))
    except ValueError as err:
        raise ValueError(f"{path}: {err} (write one with fedapp keygen --threshold)") from None
    if public is not None and key.fingerprint != public.fingerprint:
        raise ValueError(f"{path} is the group key of another threshold key (fingerprint "
                         f"{key.fingerprint[:16]}..., this run's is {public.fingerprint[:16]}"
                         "...): give every client the run's group key")
    return key


def load_threshold_public_key(path: Path) -> ThresholdPublicKey:
    """A threshold public key file; a key share is refused (the server holds none)."""
    data = _read(path)
    if "share" in data or "key" in data:
        what = "a key share" if "share" in data else "the clients' group key"
        raise ValueError(f"{path} holds {what}: give the server the public key "
                         f"({THRESHOLD_PUBLIC_NAME})")
    return ThresholdPublicKey.from_dict(data)


def load_key_share(path: Path, public: ThresholdPublicKey | None = None) -> KeyShare:
    """A holder's key share file, refused if group or others may read it, if it holds a
    public key, or (given ``public``) if it is a share of another key.

    Raises
    ------
    ValueError
        Naming the file and what is wrong (never the share).
    PermissionError
        With the ``chmod`` command that fixes it.
    """
    check_private(path)
    share = KeyShare.from_dict(_read(path))
    if public is not None and share.public.fingerprint != public.fingerprint:
        raise ValueError(f"{path} is a share of another key (fingerprint "
                         f"{share.public.fingerprint[:16]}..., this run's is "
                         f"{public.fingerprint[:16]}...): give this holder its share of the "
                         "run's key")
    return share


def write_identity_key(path: Path, identity: Identity) -> None:
    """An identity private key as unencrypted PKCS#8 PEM (mode 0600; refuses to
    overwrite)."""
    key = Ed25519PrivateKey.from_private_bytes(identity.private)
    write_secret(path, key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode("ascii"))


def write_identity(directory: Path) -> tuple[Path, Path]:
    """A fresh masking identity key pair for one client node: ``secagg-identity.key``
    (Ed25519 private key, PKCS#8 PEM, mode 0600: this node only) and
    ``secagg-identity.pub`` (the public key in hex, for the federation's roster,
    :func:`write_roster`). Returns ``(public, private)``; refuses to overwrite a
    private key."""
    directory.mkdir(parents=True, exist_ok=True)
    identity = Identity.generate()
    write_identity_key(directory / IDENTITY_NAME, identity)
    (directory / IDENTITY_PUBLIC_NAME).write_text(identity.public.hex() + "\n")
    return directory / IDENTITY_PUBLIC_NAME, directory / IDENTITY_NAME


def write_simulation_identities(directory: Path, nodes: int) -> Path:
    """For a simulation of ``nodes`` nodes, whose nodes share one key directory: an
    identity key per partition (``secagg-identity-<partition-id>.key``, 0600) and the
    roster of their public keys; returns the roster's path."""
    if nodes < 2:
        raise ValueError(f"a masking federation has at least 2 nodes, got {nodes}")
    directory.mkdir(parents=True, exist_ok=True)
    identities = [Identity.generate() for _ in range(nodes)]
    for i, identity in enumerate(identities):
        write_identity_key(directory / identity_name(i), identity)
    return write_roster(directory / ROSTER_NAME, [i.public for i in identities])


def identity_name(partition_id: int | None = None) -> str:
    """The identity key file of a node (of a simulated partition, if given)."""
    return IDENTITY_NAME if partition_id is None else f"secagg-identity-{partition_id}.key"


def load_identity(path: Path) -> Identity:
    """An identity key file, refused if others may read it or if malformed."""
    check_private(path)
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an unencrypted Ed25519 private key in PEM (make one "
                         "with 'fedapp keygen --secagg')")
    return Identity(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption()))


def read_public_identity(path: Path) -> bytes:
    """A ``secagg-identity.pub`` file's public key (a private key file is refused)."""
    text = Path(path).read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError(f"{path} does not hold a public identity key (64 hex digits, as "
                         "'fedapp keygen --secagg' writes to secagg-identity.pub)")
    return key


def write_roster(path: Path, keys: list[bytes]) -> Path:
    """The roster of the federation's public identity keys (JSON); every client node
    gets a copy (it is public: the server may hold it too)."""
    roster = Roster.of(keys)  # checks them
    Path(path).write_text(json.dumps({"version": 1, "keys": sorted(k.hex() for k in
                                                                   roster.keys)}) + "\n")
    return Path(path)


def load_roster(path: Path) -> Roster:
    """A roster file.

    Raises
    ------
    ValueError
        If it cannot be read or holds anything but distinct Ed25519 public keys.
    """
    data = _read(path)
    keys = data.get("keys")
    try:
        if data.get("version") != 1 or not isinstance(keys, list) \
                or not all(isinstance(k, str) for k in keys):
            raise IdentityError("expected {\"version\": 1, \"keys\": [hex, ...]}")
        return Roster.of([bytes.fromhex(k) for k in keys])
    except (IdentityError, ValueError) as err:
        raise ValueError(f"{path} is not a roster: {err} (see 'fedapp roster')") from None
