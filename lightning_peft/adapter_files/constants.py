"""The names and versions of adapter files, in one place: what a directory holds and which formats we write."""

CONFIG_NAME = "adapter_config.json"
"""The JSON half of an adapter directory, in both formats (native and Hugging Face PEFT's)."""

WEIGHTS_NAME = "adapter_model.safetensors"
"""The tensor half of an adapter directory, in both formats."""

PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt", "adapter_model.pth")
"""Pickle files a directory may hold instead; refused on purpose (unpickling can run code)."""

FORMAT_VERSION = 1
"""The native format's version, written into ``adapter_config.json`` and Lightning checkpoints; newer is refused."""

NATIVE_TENSOR_METADATA = {"format": "lightning_peft"}
"""The safetensors header metadata of a native adapter file."""

PEFT_TENSOR_METADATA = {"format": "pt"}
"""The safetensors header metadata PEFT writes (``save_pretrained``)."""

PEFT_VERSION = "0.21.2"
"""The Hugging Face PEFT release our PEFT-format files were checked against."""

PEFT_PREFIX = "base_model.model."
"""What PEFT puts before every tensor name: its ``PeftModel`` wraps the base model twice."""

CHECKPOINT_KEY = "lightning_peft"
"""The Lightning checkpoint entry holding the adapter metadata (methods, base shapes), as the callbacks write it."""
