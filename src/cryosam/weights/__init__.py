"""Model weights: which ones cryosam supports, where it finds them, how it fetches and checks them.

Supported models (:data:`REGISTRY`): SAM ``vit_b``/``vit_l``/``vit_h`` checkpoints (one
``.pth`` file each, from Meta's official URLs, full sha256 recorded) and DINOv2
small/base/large/giant with and without registers (Hugging Face hub snapshots at a pinned
commit).

Lookup order, for every model (first hit wins; lookup never touches the network):

1. an explicit path (the ``path`` argument, or a ``model`` argument that is itself a path);
2. every folder named in ``$CRYOSAM_CHECKPOINTS`` (several may be joined with ``:``);
3. ``checkpoints/``: the repository's folder (editable install), then ``./checkpoints`` in
   the working directory;
4. DINOv2 only: the Hugging Face cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or
   ``~/.cache/huggingface/hub``), the pinned revision first, then whatever ``main`` points to.
   ``HF_HUB_OFFLINE=1`` is honoured: downloads refuse to start, lookup is local anyway.

Layout of a checkpoints folder::

    checkpoints/sam_vit_h_4b8939.pth              SAM, official file name
    checkpoints/sam_vit_h_4b8939.pth.sha256       written once the file is verified
    checkpoints/dinov2-with-registers-large/      DINOv2, one folder per model:
        config.json, preprocessor_config.json, model.safetensors,
        cryosam-weights.json                      manifest: repo, revision, file sha256s

A missing model raises :class:`~cryosam.errors.MissingWeightsError` whose one-line message
(:func:`missing_message`) names the command to run on a machine with internet and where to
copy the result. Downloads (SAM through pooch, DINOv2 through huggingface_hub) resume, are
checked against the recorded checksums and take their final name only when they check out.

Modules, each importing only those before it: :mod:`.specs` (the registry), :mod:`.locate`
(lookup, messages), :mod:`.verify` (records, re-hashing, :func:`weights_id`),
:mod:`.download` (fetching).
"""

from __future__ import annotations

from cryosam.weights.download import (
    ResumingDownloader,
    download,
    download_dinov2,
    download_file,
    download_sam,
    install_snapshot,
    sam_url,
)
from cryosam.weights.locate import (
    Found,
    builtin_dirs,
    check_manifest_sizes,
    default_download_dir,
    env_dirs,
    find,
    hf_cache_dir,
    hf_offline,
    is_model_dir,
    locate_dinov2,
    locate_sam,
    missing_message,
    read_manifest,
    search_dirs,
)
from cryosam.weights.specs import (
    CHECKPOINTS_ENV,
    DEFAULT_NAMES,
    DINOV2_PATTERNS,
    MANIFEST_NAME,
    REGISTRY,
    SAM_BASE_URL,
    SAM_BASE_URL_ENV,
    WeightSpec,
    canonical_name,
    get_spec,
)
from cryosam.weights.verify import (
    Status,
    sidecar_path,
    status,
    verify_found,
    weights_id,
)

__all__ = [
    "CHECKPOINTS_ENV",
    "DEFAULT_NAMES",
    "DINOV2_PATTERNS",
    "MANIFEST_NAME",
    "REGISTRY",
    "SAM_BASE_URL",
    "SAM_BASE_URL_ENV",
    "Found",
    "ResumingDownloader",
    "Status",
    "WeightSpec",
    "builtin_dirs",
    "canonical_name",
    "check_manifest_sizes",
    "default_download_dir",
    "download",
    "download_dinov2",
    "download_file",
    "download_sam",
    "env_dirs",
    "find",
    "get_spec",
    "hf_cache_dir",
    "hf_offline",
    "install_snapshot",
    "is_model_dir",
    "locate_dinov2",
    "locate_sam",
    "missing_message",
    "read_manifest",
    "sam_url",
    "search_dirs",
    "sidecar_path",
    "status",
    "verify_found",
    "weights_id",
]
