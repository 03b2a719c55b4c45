"""The supported models: names, files, sizes, checksums and pinned hub revisions.

Nothing here touches the disk or the network; every other weights module builds on this one.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryosam.errors import CryosamError

SAM_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_BASE_URL_ENV = "CRYOSAM_SAM_BASE_URL"
CHECKPOINTS_ENV = "CRYOSAM_CHECKPOINTS"
MANIFEST_NAME = "cryosam-weights.json"
DINOV2_PATTERNS = ("*.json", "*.safetensors")  # config, preprocessor config, weights


@dataclass(frozen=True)
class WeightSpec:
    """One supported model: what it is, where it comes from, how to check it."""

    name: str  # the name `cryosam weights download` takes
    kind: str  # "sam" | "dinov2"
    description: str
    size_bytes: int  # exact for SAM files, approximate (weights file) for DINOv2
    license: str
    filename: str | None = None  # SAM: official file name
    sha256: str | None = None  # SAM: full sha256 of the file
    md5: str | None = None  # SAM: the file name carries the leading hex of this md5
    repo_id: str | None = None  # DINOv2: hub id
    revision: str | None = None  # DINOv2: pinned hub commit
    aliases: tuple[str, ...] = ()

    @property
    def target(self) -> str:
        """File or folder name inside a checkpoints folder."""
        return self.filename if self.kind == "sam" else self.name

    @property
    def download_command(self) -> str:
        """The command that fetches this model on a machine with internet."""
        return f"cryosam weights download {self.name} --dir checkpoints/"


def _sam(variant: str, filename: str, size: int, sha256: str, md5: str, params: str) -> WeightSpec:
    return WeightSpec(
        name=f"sam_{variant}", kind="sam", description=f"SAM ViT-{variant[-1].upper()} ({params})",
        size_bytes=size, license="Apache-2.0", filename=filename, sha256=sha256, md5=md5,
        aliases=(variant, filename, filename.removesuffix(".pth")),
    )


_VIT_LETTER = {"small": "S", "base": "B", "large": "L", "giant": "g"}


def _dino(size: str, registers: bool, approx_bytes: int, revision: str, params: str) -> WeightSpec:
    name = f"dinov2-with-registers-{size}" if registers else f"dinov2-{size}"
    what = "with registers" if registers else "no registers"
    vit = f"ViT-{_VIT_LETTER[size]}/14"
    return WeightSpec(
        name=name, kind="dinov2", description=f"DINOv2 {vit} {what} ({params})",
        size_bytes=approx_bytes, license="Apache-2.0", repo_id=f"facebook/{name}",
        revision=revision, aliases=(f"facebook/{name}",),
    )


# Sizes and sha256 of the SAM files as published by Meta (the md5 is what their names carry);
# DINOv2 revisions are the hub commits of the facebook/dinov2-* repositories.
_SPECS = (
    _sam("vit_b", "sam_vit_b_01ec64.pth", 375_042_383,
         "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
         "01ec64d29a2fca3f0661936605ae66f8", "91M params"),
    _sam("vit_l", "sam_vit_l_0b3195.pth", 1_249_524_607,
         "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
         "0b3195507c641ddb6910d2bb5adee89c", "308M params"),
    _sam("vit_h", "sam_vit_h_4b8939.pth", 2_564_550_879,
         "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
         "4b8939a88964f0f4ff5f5b2642c598a6", "636M params"),
    _dino("small", False, 88_000_000, "ed25f3a31f01632728cabb09d1542f84ab7b0056", "22M params"),
    _dino("base", False, 346_000_000, "f9e44c814b77203eaa57a6bdbbd535f21ede1415", "87M params"),
    _dino("large", False, 1_217_522_888, "47b73eefe95e8d44ec3623f8890bd894b6ea2d6c",
          "304M params"),
    _dino("giant", False, 4_546_005_432, "611a9d42f2335e0f921f1e313ad3c1b7178d206d",
          "1.1B params"),
    _dino("small", True, 88_000_000, "0d9846e56b43a21fa46d7f3f5070f0506a5795a9", "22M params"),
    _dino("base", True, 346_000_000, "a1d738ccfa7ae170945f210395d99dde8adb1805", "87M params"),
    _dino("large", True, 1_218_000_000, "e4c89a4e05589de9b3e188688a303d0f3c04d0f3",
          "304M params"),
    _dino("giant", True, 4_546_000_000, "8d0d49f77fb8b5dd78842496ff14afe7dd4d85cb",
          "1.1B params"),
)
REGISTRY: dict[str, WeightSpec] = {s.name: s for s in _SPECS}
DEFAULT_NAMES = ("dinov2-with-registers-large", "sam_vit_h")  # the paper's models

_ALIASES: dict[str, str] = {}
for _s in _SPECS:
    for _a in (_s.name, *_s.aliases):
        _ALIASES[_a.lower()] = _s.name


def canonical_name(name: str) -> str | None:
    """The registry name that ``name`` (any alias, any case) stands for, or None."""
    return _ALIASES.get(name.strip().lower())


def get_spec(name: str) -> WeightSpec:
    """The registry entry for ``name`` (``sam_vit_h``, ``vit_h``, ``facebook/dinov2-large``...)."""
    key = canonical_name(name)
    if key is None:
        raise CryosamError(
            f"unknown model '{name}'; known: {', '.join(REGISTRY)} (see `cryosam weights list`)"
        )
    return REGISTRY[key]
