"""Judge rubrics: what the LLM judge scores a response against, one Markdown file per rubric.

Why files: a rubric is prose that people tune, so it lives as a readable Markdown file next to the
code (or anywhere a track's `rubric:` points to), not as a string in Python. Its small front matter
carries what the pipeline needs to use the judge's answers safely:

    ---
    id: helpfulness
    version: 3
    scale: 1-10
    title: Helpfulness        (optional)
    ---
    criteria text ...

`id@vversion` (:attr:`Rubric.key`) is part of every judge cache key, so editing a rubric's text
without bumping its version would serve stale verdicts: bump the version whenever the criteria
change. `scale` is an inclusive integer range; :meth:`Rubric.normalize` maps it to [0, 1] so that
rewards from different rubrics are comparable. A malformed file is a user error with one line that
names the file and the problem, raised when the rubric is loaded, not in the middle of a night.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from storage.errors import UserError

__all__ = ["RUBRICS_DIR", "Rubric", "load_rubric", "shipped_rubrics"]

RUBRICS_DIR = Path(__file__).parents[1] / "assets" / "rubrics"

_FENCE = "---"
_REQUIRED_KEYS = ("id", "version", "scale")
_KNOWN_KEYS = (*_REQUIRED_KEYS, "title")
_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,99}")  # fits judgments.rubric_id
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,49}")  # fits judgments.rubric_version
_SCALE = re.compile(r"(\d{1,6})\s*-\s*(\d{1,6})")
_KEY_LINE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*)")


@dataclass(frozen=True)
class Rubric:
    """One judge rubric: identity, integer score scale and the criteria text shown to the judge."""

    id: str  # e.g. "helpfulness"; stored with every judgment
    version: str  # bumped whenever the criteria change; part of the cache key
    title: str  # human-readable name, shown in the judge's instructions
    scale_min: int  # lowest score the judge may give (inclusive)
    scale_max: int  # highest score the judge may give (inclusive), > scale_min
    text: str  # the criteria and score anchors, Markdown

    @property
    def key(self) -> str:
        """`id@vversion`, e.g. `helpfulness@v3`: what a cached verdict was judged against."""
        return f"{self.id}@v{self.version}"

    def normalize(self, raw: float) -> float:
        """Map a raw score on this rubric's scale to [0, 1]; a score outside the scale is a ValueError."""
        if not self.scale_min <= raw <= self.scale_max:  # also refuses NaN
            raise ValueError(
                f"score {raw} is outside the scale {self.scale_min}-{self.scale_max} of {self.key}"
            )
        return (raw - self.scale_min) / (self.scale_max - self.scale_min)


def shipped_rubrics() -> list[str]:
    """Ids of the rubrics that ship with overnight, sorted."""
    return sorted(path.stem for path in RUBRICS_DIR.glob("*.md"))


def load_rubric(name_or_path: str) -> Rubric:
    """Load a shipped rubric by id (`helpfulness`) or a rubric file by path; UserError if invalid."""
    return _parse_rubric(_rubric_path(name_or_path))


def _rubric_path(name_or_path: str) -> Path:
    shipped = shipped_rubrics()
    if name_or_path in shipped:
        return RUBRICS_DIR / f"{name_or_path}.md"
    path = Path(name_or_path)
    looks_like_path = "/" in name_or_path or "\\" in name_or_path or path.suffix != ""
    if path.exists() or looks_like_path:
        return path
    raise UserError(f"{name_or_path}: no such rubric file, and not a shipped rubric ({', '.join(shipped)})")


def _parse_rubric(path: Path) -> Rubric:
    content = _read(path)
    fields, body = _split_front_matter(content, path)
    scale_min, scale_max = _parse_scale(fields["scale"], path)
    rubric_id, version = fields["id"], fields["version"]
    if not _ID.fullmatch(rubric_id):
        raise UserError(f"{path}: id {rubric_id!r} must be lower-case letters, digits, '_' or '-'")
    if not _VERSION.fullmatch(version):
        raise UserError(f"{path}: version {version!r} must be a number or a short tag like 2 or 2024-11")
    if not body:
        raise UserError(f"{path}: no criteria text after the front matter")
    title = fields.get("title") or rubric_id
    return Rubric(rubric_id, version, title, scale_min, scale_max, body)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: rubric file not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: rubric file is not UTF-8 text") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read rubric file ({error.strerror or error})") from None


def _split_front_matter(content: str, path: Path) -> tuple[dict[str, str], str]:
    """The front matter's key/value pairs and the stripped body after it."""
    lines = content.removeprefix("\ufeff").splitlines()
    if not lines or lines[0].strip() != _FENCE:
        raise UserError(f"{path}: must start with a '---' front matter block (id, version, scale)")
    try:
        end = next(index for index, line in enumerate(lines[1:], start=1) if line.strip() == _FENCE)
    except StopIteration:
        raise UserError(f"{path}: front matter is not closed by a '---' line") from None
    fields = _parse_fields(lines[1:end], path)
    return fields, "\n".join(lines[end + 1 :]).strip()


def _parse_fields(lines: list[str], path: Path) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _KEY_LINE.fullmatch(line.strip())
        if match is None:
            raise UserError(f"{path}: front matter line {line.strip()!r} is not 'key: value'")
        key, value = match.group(1), _unquote(match.group(2).strip())
        if key not in _KNOWN_KEYS:
            raise UserError(f"{path}: unknown front matter key {key!r} (known: {', '.join(_KNOWN_KEYS)})")
        if key in fields:
            raise UserError(f"{path}: front matter key {key!r} is given twice")
        fields[key] = value
    for key in _REQUIRED_KEYS:
        if not fields.get(key):
            raise UserError(f"{path}: front matter key {key!r} is missing")
    return fields


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1].strip()
    return value


def _parse_scale(value: str, path: Path) -> tuple[int, int]:
    match = _SCALE.fullmatch(value)
    if match is None or int(match.group(1)) >= int(match.group(2)):
        raise UserError(f"{path}: scale {value!r} must be 'MIN-MAX' with integers MIN < MAX, e.g. 1-10")
    return int(match.group(1)), int(match.group(2))
