"""Key files: Paillier key pairs (JSON) and the secure-aggregation authentication
key (hex). Secret files are written with mode 0600 and refused when other users
can read them. The server only ever loads a Paillier public key file.

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

from .paillier import PrivateKey, PublicKey, generate_keypair

PUBLIC_NAME, PRIVATE_NAME = "paillier.pub.json", "paillier.key.json"
AUTH_KEY_NAME = "secagg-auth.key"
AUTH_KEY_BYTES = 32
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


def check_private(path: Path) -> None:
    """Refuse a secret file that group or others may read, write or execute.

    Raises
    ------
    PermissionError
        With the ``chmod`` command that fixes it.
    """
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


def write_auth_key(directory: Path) -> Path:
    """A fresh secure-aggregation authentication key (32 random bytes, hex, mode
    0600) for every client node of a federation, never for the server."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / AUTH_KEY_NAME
    write_secret(path, os.urandom(AUTH_KEY_BYTES).hex() + "\n")
    return path


def load_auth_key(path: Path) -> bytes:
    """An authentication key file, refused if others may read it or if malformed."""
    check_private(path)
    try:
        key = bytes.fromhex(Path(path).read_text().strip())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read an authentication key from {path}: {err} "
                         "(see 'fedapp keygen --secagg')") from None
    if len(key) != AUTH_KEY_BYTES:
        raise ValueError(f"{path} holds {len(key)} bytes, an authentication key has "
                         f"{AUTH_KEY_BYTES}")
    return key
