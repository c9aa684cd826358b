"""SuperNode authentication key pairs, in the form Flower 1.41 expects.

A SuperLink started with ``--enable-supernode-auth`` lets a SuperNode in only if
its public key was registered beforehand through the Control API (``flwr
supernode register PUBLIC_KEY``), and every Fleet request of the SuperNode
carries a timestamp signed (ECDSA, SHA-256) with the matching private key
(``flower-supernode --auth-supernode-private-key FILE``). Flower reads the
private key as an OpenSSH private key and the public key as an OpenSSH public
key, both on a NIST curve; we make P-384 keys, as Flower does for itself.

Each client node makes its own pair: the private key (mode 0600) never leaves
the node, the public key goes to whoever registers nodes with the SuperLink.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from strategies.keyfiles import check_private, write_secret

PRIVATE_NAME, PUBLIC_NAME = "supernode.key", "supernode.pub"
#: Curves accepted for SuperNode keys: the NIST curves OpenSSH keys can use (Flower's
#: ``uses_nist_ec_curve`` also takes P-192 and P-224).
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def write_node_keypair(directory: Path) -> tuple[Path, Path]:
    """Make a SuperNode key pair in ``directory``.

    Parameters
    ----------
    directory : Path
        Created if missing. Receives ``supernode.key`` (OpenSSH EC P-384 private
        key, mode 0600: this node only) and ``supernode.pub`` (OpenSSH public key:
        for ``fedapp register`` / ``flwr supernode register``).

    Returns
    -------
    tuple[Path, Path]
        ``(public key path, private key path)``.

    Raises
    ------
    FileExistsError
        If a private key is already there (a registered key is never replaced).
    """
    directory.mkdir(parents=True, exist_ok=True)
    public_path, private_path = directory / PUBLIC_NAME, directory / PRIVATE_NAME
    if private_path.exists():
        raise FileExistsError(f"{private_path} exists: remove it first or choose another directory")
    key = ec.generate_private_key(ec.SECP384R1())
    write_secret(private_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()).decode("ascii"))
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return public_path, private_path


def check_node_private_key(path: Path) -> Path:
    """The resolved path of a usable SuperNode private key file.

    Raises
    ------
    PermissionError
        If group or others may read it (``chmod 600`` it).
    ValueError
        If it is missing or not an unencrypted OpenSSH EC private key on a NIST curve.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"SuperNode private key {path} not found (make one with "
                         "'fedapp keygen --supernode --out DIR')")
    check_private(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(f"{path} is not an unencrypted OpenSSH private key ({err}); "
                         "make one with 'fedapp keygen --supernode --out DIR'") from None
    _check_curve(key, path)
    return path


def check_node_public_key(path: Path) -> Path:
    """The resolved path of a SuperNode public key file, ready to register.

    Raises
    ------
    ValueError
        If it is missing, holds private key material (give the server the
        ``.pub`` file only) or is not an OpenSSH EC public key on a NIST curve.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"SuperNode public key {path} not found")
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        raise ValueError(f"{path} holds a private key: register the node's public key "
                         f"({PUBLIC_NAME}); the private key stays on the client node")
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as err:
        raise ValueError(f"{path} is not an OpenSSH public key ({err}); "
                         "make one with 'fedapp keygen --supernode --out DIR'") from None
    _check_curve(key, path)
    return path


def _check_curve(key: object, path: Path) -> None:
    ok = isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) \
        and isinstance(key.curve, NIST_CURVES)
    if not ok:
        raise ValueError(f"{path} is not an EC key on a NIST curve (P-256, P-384, P-521), "
                         "which Flower needs for SuperNode authentication")
