"""SmolVLM on IBM's Foundation Model Stack.

Importing this package registers, with FMS's own registries, the architecture ``smolvlm``
(variants ``256m``, ``500m``, ``2.2b``), its ``hf`` checkpoint adapter, and the HF architectures
``SmolVLMForConditionalGeneration`` / ``Idefics3ForConditionalGeneration`` for ``get_model("hf_pretrained")``.
"""

from importlib.metadata import PackageNotFoundError, version

from fms_smolvlm.hf_config import register_hf_architectures
from fms_smolvlm.smolvlm import CheckpointError, SmolVLM, SmolVLMConfig

register_hf_architectures()

try:
    __version__ = version("fms-smolvlm")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0+unknown"

from fms_smolvlm.captioner import CaptionResult, Captioner  # noqa: E402  (needs the registrations above)
from fms_smolvlm.hf_api import export_hf_checkpoint, to_hf_api  # noqa: E402

__all__ = [
    "CaptionResult",
    "Captioner",
    "CheckpointError",
    "SmolVLM",
    "SmolVLMConfig",
    "export_hf_checkpoint",
    "to_hf_api",
]
