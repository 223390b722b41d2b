"""Files written for good: atomic writes, sha256 digests and model cards, in one place.

* **Atomic writes** (:func:`atomic_write` and its text/JSON/bytes/copy forms): the content goes to
  a temporary file in the destination folder, which is then renamed over the target, so an
  interrupted run never leaves a half-written file that looks complete. Files are readable by
  everyone the umask allows (``mkstemp`` alone would leave them 0600).
* **Model cards**: a trained network is ``<stem>.safetensors`` (weights only, no pickle) and
  ``<stem>.json``, its card. Both networks of the project (the bias-field CNN and the
  CRB-trained qMRI estimators) use one card format, version 2: an envelope ::

      {"format": "qmri-bids-model-card", "format_version": 2, "kind": "bias-cnn",
       "name": <stem>, "weights_file": <stem>.safetensors, "sha256": <hex>,
       "size_bytes": <int>, ...the kind's own fields}

  :func:`write_model` writes a pair (weights first, the card last: a card next to its weights
  marks a complete pair); :func:`read_card` reads version 2 and the shipped version-1 cards of
  both kinds (``qmri-bids-bias-cnn`` with ``sha256``, ``qmri-bids-crb-estimator`` with
  ``weights_sha256``), returning the card with the envelope keys filled in;
  :func:`verify_weights` checks the weights against the card and :func:`load_weights` loads
  them. Every problem is a :class:`~qmri_bids.errors.BadDataError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qmri_bids.errors import BadDataError, CannotWriteError

CARD_FORMAT = "qmri-bids-model-card"
CARD_FORMAT_VERSION = 2
#: kind -> the ``format`` its version-1 cards carried
V1_FORMATS = {"bias-cnn": "qmri-bids-bias-cnn", "crb-estimator": "qmri-bids-crb-estimator"}
#: kind -> the key that held the weights' sha256 in its version-1 cards
_V1_SHA256_KEYS = {"bias-cnn": "sha256", "crb-estimator": "weights_sha256"}
_ENVELOPE_KEYS = ("format", "format_version", "kind", "name", "weights_file", "sha256",
                  "size_bytes")


# ----------------------------------------------------------------------------- digests


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- atomic writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None], mode: int = 0o644) -> Path:
    """Write ``path`` through ``write(temporary path)``, then rename it into place.

    A folder or temporary file that cannot be created is a
    :class:`~qmri_bids.errors.CannotWriteError` naming ``path``; the temporary file never
    survives a failure.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise CannotWriteError(f"cannot write {path}: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def json_text(obj: Any, sort_keys: bool = False) -> str:
    """Indented JSON (numpy values and paths allowed) with a final newline."""
    return json.dumps(obj, indent=2, sort_keys=sort_keys, default=_json_default) + "\n"


def atomic_write_json(path: str | Path, obj: Any, sort_keys: bool = False) -> Path:
    return atomic_write_text(path, json_text(obj, sort_keys))


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    return atomic_write(dst, lambda tmp: tmp.write_bytes(Path(src).read_bytes()))


# ----------------------------------------------------------------------------- model cards


def card_path(path: str | Path) -> Path:
    """The card of a model given as its stem, its ``.safetensors`` or its ``.json``."""
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return stem.with_name(stem.name + ".json")


def weights_path(path: str | Path) -> Path:
    """The weights of a model given as its stem, its ``.safetensors`` or its ``.json``."""
    card = card_path(path)
    return card.with_name(card.name[: -len(".json")] + ".safetensors")


def write_model(weights: str | Path, tensors: Mapping[str, Any], card: Mapping[str, Any], *,
                kind: str, metadata: Mapping[str, str] | None = None) -> tuple[Path, Path]:
    """Write ``weights`` (safetensors) and its version-2 card atomically; return both paths.

    ``card`` holds the kind's own fields; the envelope (format, version, kind, name, weights
    file, sha256, size) is added here and wins over same-named fields. ``metadata`` goes into
    the safetensors header, beside the format and kind.
    """
    from safetensors.torch import save_file

    if kind not in V1_FORMATS:
        raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(V1_FORMATS)})")
    weights = Path(weights)
    if weights.suffix != ".safetensors":
        raise ValueError(f"model weights must end in .safetensors: {weights}")
    target_card = card_path(weights)
    header = {"format": CARD_FORMAT, "kind": kind, **dict(metadata or {})}
    contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    staged: dict[str, Any] = {}

    def write_weights(tmp: Path) -> None:
        save_file(contiguous, str(tmp), metadata=header)
        staged.update(sha256=sha256_file(tmp), size_bytes=tmp.stat().st_size)

    # The weights are renamed into place before the card is written: a reader that finds a card
    # also finds the weights it describes.
    atomic_write(weights, write_weights)
    full = {"format": CARD_FORMAT, "format_version": CARD_FORMAT_VERSION, "kind": kind,
            "name": weights.stem, "weights_file": weights.name, **staged}
    full.update({k: v for k, v in card.items() if k not in _ENVELOPE_KEYS})
    atomic_write_json(target_card, full)
    return weights, target_card


def read_card(path: str | Path, *, kind: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The card of a ``kind`` model (``path``: stem, .json or .safetensors), any version.

    Version-1 cards are returned with the version-2 envelope filled in (``kind``, ``sha256``,
    ``weights_file``); ``format_version`` stays what the file says. ``required``: the kind's own
    keys that must be present.
    """
    card_file = card_path(path)
    if not card_file.is_file():
        raise BadDataError(f"model card {card_file} is missing (every model needs its .json card "
                           "next to the .safetensors weights)")
    try:
        card = json.loads(card_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadDataError(f"model card {card_file} is not readable JSON ({exc})") from exc
    if not isinstance(card, dict):
        raise BadDataError(f"model card {card_file} is not a JSON object")
    if card.get("format") == CARD_FORMAT:
        if card.get("kind") != kind:
            raise BadDataError(f"model card {card_file} describes a {card.get('kind')!r} model, "
                               f"not a {kind!r} one")
    elif card.get("format") == V1_FORMATS.get(kind):
        card = dict(card)
        card.setdefault("format_version", 1)
        card["kind"] = kind
        if _V1_SHA256_KEYS[kind] in card:
            card["sha256"] = card[_V1_SHA256_KEYS[kind]]
        card.setdefault("weights_file", weights_path(card_file).name)
    else:
        raise BadDataError(f"model card {card_file} is not a {kind} model card (format "
                           f"{card.get('format')!r})")
    missing = [k for k in ("sha256", "weights_file", *required) if k not in card]
    if missing:
        raise BadDataError(f"model card {card_file} is not a complete {kind} model card "
                           f"(missing {', '.join(missing)})")
    return card


def verify_weights(path: str | Path, *, kind: str, required: tuple[str, ...] = ()
                   ) -> dict[str, Any]:
    """The card of a model whose weights exist and match its sha256 (else BadDataError)."""
    card = read_card(path, kind=kind, required=required)
    weights = card_path(path).with_name(card["weights_file"])
    if not weights.is_file():
        raise BadDataError(f"model weights {weights} not found (its card "
                           f"{card_path(path).name} exists)")
    digest = sha256_file(weights)
    if digest != card["sha256"]:
        raise BadDataError(f"model weights {weights} failed its integrity check: sha256 "
                           f"{digest[:16]}… does not match its card {card_path(path).name} "
                           f"({str(card['sha256'])[:16]}…): the file is corrupt, truncated or "
                           "was replaced")
    return card


def load_weights(path: str | Path, *, kind: str, required: tuple[str, ...] = ()
                 ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, card) of a verified model: safetensors only, never pickle."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    card = verify_weights(path, kind=kind, required=required)
    weights = card_path(path).with_name(card["weights_file"])
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise BadDataError(f"model weights {weights} cannot be read: {exc}") from exc
    return tensors, card
