"""Path or Hub id -> config -> model built on the meta device -> weights streamed in, one tensor at a time.

The model classes come from the caller (model/chatglm.py, which defines them with their from_pretrained): this
module builds whatever class model_class_for(config) names and imports none of them."""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
from typing import Callable, Iterator

import torch
from torch import nn

from . import kernels, lora
from .config import ChatGLMConfig
from .hub import CheckpointError, read_json, resolve_model_dir
from .tokenizer import ChatGLMTokenizer

logger = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
IGNORED_TENSORS = ("transformer.rotary_pos_emb.inv_freq",)  # recomputed, never read


# ---- device and dtype ---------------------------------------------------------------------------
class DeviceUnavailableError(RuntimeError):
    """The asked-for device is not there in this torch build or on this machine; the message says what to do."""


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None -> cuda, else mps, else cpu; DeviceUnavailableError for a device torch cannot use here."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:  # e.g. "gpu": torch's message lists every device type it knows
        raise DeviceUnavailableError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "torch finds no CUDA GPU (is the NVIDIA driver installed?)")
            raise DeviceUnavailableError(
                f"device {str(device)!r}: {why} (torch {torch.__version__}); install a CUDA build of torch "
                f"(https://pytorch.org/get-started/locally/) or run on the CPU (--device cpu)")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceUnavailableError(f"device {str(device)!r}: torch sees {count} CUDA GPU(s), "
                                         f"cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not _mps_available():
        raise DeviceUnavailableError(f"device 'mps': this torch (torch {torch.__version__}) has no MPS (Apple GPU) "
                                     f"support on this machine; run on the CPU (--device cpu)")
    return device


def cuda_native_bf16(device: torch.device) -> bool:
    """Whether the CUDA GPU `device` computes in bf16 natively: compute capability 8.0 (Ampere) or newer.
    torch.cuda.is_bf16_supported() also says yes on pre-Ampere GPUs (T4, V100, RTX 20xx), where bf16 is
    emulated and slow, and it asks only about the current GPU."""
    if torch.version.hip is not None:  # ROCm: torch's answer is about the hardware
        return torch.cuda.is_bf16_supported()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (8, 0)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto'/None -> bf16 on Ampere+ GPUs (fp16 on older ones), fp16 on MPS, bf16 on CPUs with native bf16,
    else fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if cuda_native_bf16(device) else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if kernels.native_bf16() else torch.float32
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


# ---- reading checkpoint files -------------------------------------------------------------------
def checkpoint_files(path: str) -> list[str]:
    """Weight files of a checkpoint dir: safetensors preferred, sharded via an index or single."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = os.path.join(path, index_name)
        if os.path.isfile(index):
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index} has no weight_map of tensor name -> file name; restore it from the "
                                      f"original checkpoint")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
            if missing:
                raise CheckpointError(f"{index} names shards that are not there: {missing}; download them too")
            return [os.path.join(path, s) for s in shards]
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise CheckpointError(
        f"{path} has no weights (model.safetensors, model.safetensors.index.json, pytorch_model.bin or "
        f"pytorch_model.bin.index.json); download them with the rest of the checkpoint")


def mmap_enabled() -> bool:
    return os.environ.get("CHATGLM_MMAP", "1") not in ("0", "false", "no")


def read_safetensors(filename: str, zero_copy=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of a .safetensors file.

    A tensor for which zero_copy(name, dtype) is true is a view of a private (copy-on-write) memory map of
    the file: nothing is read until it is used, and its memory is the page cache's, so a checkpoint loads in
    about the time it takes to read its header and is never held twice (file cache + copy) in memory. Writes
    to such a tensor change only this process's copy. Every other tensor is read straight into its own buffer.
    """
    with open(filename, "rb", buffering=0) as f:
        header, base = _safetensors_header(f, filename)
        mapped = None
        for name, (start, end, dtype, shape) in sorted(header.items(), key=lambda kv: kv[1][0]):
            if end > start and zero_copy is not None and zero_copy(name, dtype):
                if mapped is None:
                    try:
                        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                        if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
                            mapped.madvise(mmap.MADV_WILLNEED)  # start reading ahead in the background
                    except (OSError, ValueError) as exc:  # a file system without mmap: read instead
                        logger.info("%s: cannot map (%s); reading it", filename, exc)
                        zero_copy = None
                if mapped is not None and zero_copy is not None:
                    itemsize = torch.empty((), dtype=dtype).element_size()
                    tensor = torch.frombuffer(mapped, dtype=dtype, count=(end - start) // itemsize,
                                              offset=base + start)
                    yield name, tensor.view(shape)
                    continue
            tensor = torch.empty(shape, dtype=dtype)
            if end > start:
                f.seek(base + start)
                view = memoryview(tensor.view(-1).view(torch.uint8).numpy())
                read = 0
                while read < end - start:
                    n = f.readinto(view[read:])
                    if not n:
                        raise CheckpointError(f"{filename} is truncated (it ends inside {name}); download it again")
                    read += n
            yield name, tensor


def _safetensors_header(f, filename: str) -> tuple[dict, int]:
    """{name: (start, end, dtype, shape)} and the data's file offset; CheckpointError when the header is damaged
    or the file is shorter than the header says (caught here, before any tensor is read)."""
    size = os.fstat(f.fileno()).st_size

    def damaged(why: str) -> CheckpointError:
        return CheckpointError(f"{filename} is truncated or corrupt ({why}); download it again")

    header_len = struct.unpack("<Q", f.read(8))[0] if size >= 8 else None
    if header_len is None or header_len > size - 8:
        raise damaged(f"{size} bytes, shorter than its header")
    try:
        raw = json.loads(f.read(header_len))
        raw.pop("__metadata__", None)
        header = {}
        for name, info in raw.items():
            start, end = (int(x) for x in info["data_offsets"])
            dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], [int(d) for d in info["shape"]]
            if not 0 <= start <= end or end - start != torch.Size(shape).numel() * dtype.itemsize:
                raise ValueError(f"{name}: offsets {start}..{end} do not fit shape {shape} of {info['dtype']}")
            header[name] = (start, end, dtype, shape)
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # bad JSON, dtype, offsets or shape
        raise damaged(f"bad header: {e}") from e
    needed = 8 + header_len + max((end for _, end, _, _ in header.values()), default=0)
    if needed > size:
        raise damaged(f"{size} bytes of the {needed} its header describes")
    return header, 8 + header_len


def read_bin(filename: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of a torch zip checkpoint, loaded with weights_only=True (no code execution)."""
    import pickle

    try:
        state = torch.load(filename, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:  # weights_only refused an object: loading it would run its code
        raise CheckpointError(f"{filename} holds objects other than tensors, refused by weights_only loading "
                              f"({str(e).splitlines()[0]}); use a checkpoint of plain tensors") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # truncated zip, bad central directory, ...
        raise CheckpointError(f"{filename} is truncated or corrupt, not a readable PyTorch checkpoint "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); download it again") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{filename} holds a {type(state).__name__}, not a dict of tensors")
    try:
        for name in list(state):
            tensor = state.pop(name)
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{filename}: {name} is a {type(tensor).__name__}, not a tensor")
            yield name, tensor
    finally:
        del state


def read_weights(filename: str, zero_copy=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of one weight file, .safetensors or .bin; zero_copy: see read_safetensors."""
    if filename.endswith(".safetensors"):
        return read_safetensors(filename, zero_copy)
    return read_bin(filename)  # memory-mapped anyway


def iter_checkpoint(path: str, zero_copy=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every weight; zero_copy: see read_safetensors (.bin files are memory-mapped anyway)."""
    for filename in checkpoint_files(path):
        yield from read_weights(filename, zero_copy)


def checkpoint_nbytes(path: str) -> int:
    return sum(os.path.getsize(f) for f in checkpoint_files(path))


# ---- P-Tuning v2 checkpoints -------------------------------------------------------------------
PREFIX_ENCODER = "transformer.prefix_encoder."


class PrefixCheckpoint:
    """A P-Tuning v2 checkpoint folder as the original training script saves it: pytorch_model.bin holding
    `transformer.prefix_encoder.*` (read with weights_only=True), and pre_seq_len / prefix_projection in its
    config.json or ptuning.json. Arguments override the files; without either, they follow from the tensors
    (rows of the embedding; trans.* present)."""

    def __init__(self, path: str, pre_seq_len: int | None = None, prefix_projection: bool | None = None):
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise CheckpointError(f"P-Tuning checkpoint {path} is not a directory; pass the folder the training "
                                  f"script saved (it holds pytorch_model.bin)")
        self.filename = os.path.join(path, "pytorch_model.bin")
        if not os.path.isfile(self.filename):
            raise CheckpointError(f"P-Tuning checkpoint {path} has no pytorch_model.bin (the prefix encoder's "
                                  f"weights); pass the checkpoint-N folder the training script saved")
        self.tensors = {name[len(PREFIX_ENCODER):]: t for name, t in read_bin(self.filename)
                        if name.startswith(PREFIX_ENCODER)}
        if "embedding.weight" not in self.tensors:
            raise CheckpointError(f"{self.filename} holds no {PREFIX_ENCODER}embedding.weight: not a P-Tuning v2 "
                                  f"checkpoint")
        settings = {}
        for name in ("config.json", "ptuning.json"):  # ptuning.json, the more specific, wins
            if os.path.isfile(os.path.join(path, name)):
                found = read_json(os.path.join(path, name))
                settings.update({k: found[k] for k in ("pre_seq_len", "prefix_projection") if found.get(k) is not None})
        if pre_seq_len is not None:
            settings["pre_seq_len"] = pre_seq_len
        if prefix_projection is not None:
            settings["prefix_projection"] = prefix_projection
        self.pre_seq_len = settings.get("pre_seq_len", self.tensors["embedding.weight"].shape[0])
        self.prefix_projection = bool(settings.get("prefix_projection", "trans.0.weight" in self.tensors))
        if isinstance(self.pre_seq_len, bool) or not isinstance(self.pre_seq_len, int) or self.pre_seq_len <= 0:
            raise CheckpointError(f"P-Tuning checkpoint {path}: pre_seq_len={self.pre_seq_len!r} must be a positive "
                                  f"number of tokens")

    def config_overrides(self) -> dict:
        return {"pre_seq_len": self.pre_seq_len, "prefix_projection": self.prefix_projection}

    def load_into(self, model, device) -> None:
        """Put the prefix encoder's tensors into `model` (float32, on `device`); CheckpointError naming the file
        when one is missing, unexpected, or of another shape than the base model with this prefix needs."""
        encoder = model.transformer.prefix_encoder
        expected = dict(encoder.named_parameters())
        missing = sorted(set(expected) - set(self.tensors))
        extra = sorted(set(self.tensors) - set(expected))
        if missing or extra:
            why = (f"lacks {[PREFIX_ENCODER + n for n in missing]}" if missing else
                   f"holds {[PREFIX_ENCODER + n for n in extra]}, which this model does not have")
            raise CheckpointError(f"{self.filename} {why} (pre_seq_len={self.pre_seq_len}, prefix_projection="
                                  f"{str(self.prefix_projection).lower()}); check pre_seq_len / prefix_projection")
        for name, tensor in self.tensors.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise CheckpointError(
                    f"{self.filename}: {PREFIX_ENCODER}{name} has shape {tuple(tensor.shape)} but the base model "
                    f"with pre_seq_len={self.pre_seq_len} needs {tuple(expected[name].shape)}; this P-Tuning "
                    f"checkpoint belongs to another base model, or pre_seq_len is wrong")
            assign_tensor(encoder, name, tensor.to(device=device, dtype=torch.float32), self.filename)


# ---- LoRA adapters (PEFT format) --------------------------------------------------------------------
def read_adapter(path) -> lora.LoraAdapter:
    """A PEFT LoRA adapter folder, its .bin read with weights_only=True; see model/lora.py."""
    return lora.read_adapter(path, read_weights)


# ---- building and filling the model -------------------------------------------------------------
# the model class to build for a config (model.chatglm.model_class_for)
ModelClassFor = Callable[[ChatGLMConfig], type]


def build_empty_model(config: ChatGLMConfig, model_class: type):
    """model_class(config) with every parameter on the meta device (no memory), ready for assign_tensor."""
    with torch.device("meta"):
        return model_class(config)


def assign_tensor(model: nn.Module, name: str, tensor: torch.Tensor, source: str = "checkpoint") -> None:
    """Put tensor in as parameter `name`; CheckpointError naming the tensor and source file on a shape mismatch."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(attr)
    if old is None:
        raise KeyError(name)
    if tuple(old.shape) != tuple(tensor.shape):
        raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)} but config.json gives "
                              f"{tuple(old.shape)}; config.json does not belong to these weights")
    module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def load_weights(name_or_path: str, model_class_for: ModelClassFor, device=None, dtype=None,
                 family: str | None = None, revision: str | None = None, quantize: int | None = None,
                 progress: bool = True, device_map: dict | None = None, ptuning: PrefixCheckpoint | None = None,
                 adapter: lora.LoraAdapter | None = None):
    """Load a ChatGLM checkpoint (dir or Hub id) into a ready model (of class model_class_for(config)) in eval mode.

    quantize=4|8 quantizes a float checkpoint tensor by tensor while it is read, so the float model never
    sits in memory whole; a checkpoint with quantization_bit is loaded as it is stored. device_map (module
    name -> GPU index or device) puts each tensor straight on its module's device and installs the hooks
    that move activations between devices. ptuning: a P-Tuning v2 prefix to load on top of the base checkpoint
    (its pre_seq_len / prefix_projection go into the config); the prefix encoder stays float32. adapter: a
    LoRA adapter (read_adapter) merged into the float weights it changes as they are read (in float32, then cast
    to the dtype); on a quantized model (stored so, or quantize=) kept beside the quantized linears it adapts
    instead (QuantizedLinear.add_lora), as PEFT serves LoRA on a quantized base: merged and then quantized, a
    trained update would mostly round away.
    """
    from .placement import as_torch_device, clean_device_map, device_for, dispatch, embedding_module
    from .quantization import QuantizedLinear, quantize_weight, swap_linears

    path = resolve_model_dir(name_or_path, revision=revision)
    config = ChatGLMConfig.from_checkpoint_dir(path, family=family,
                                               **(ptuning.config_overrides() if ptuning is not None else {}))
    stored_bits = config.quantization_bit
    if quantize and stored_bits and quantize != stored_bits:
        raise CheckpointError(f"{path} is stored with {stored_bits}-bit weights; it cannot be loaded as "
                              f"{quantize}-bit (leave out --quantize)")
    model = build_empty_model(config, model_class_for(config))
    if adapter is not None:
        adapter.attach(model)  # its modules and shapes checked before any weight is read
    merge_now = set(adapter.changes) if adapter is not None else set()
    if device_map is not None:
        device_map = clean_device_map(device_map, model)
        device = as_torch_device(device_for(embedding_module(config) + ".weight", device_map))
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    bits = stored_bits or quantize
    if bits:
        swap_linears(model, bits, quantize_values=False)
    # LoRA on a quantized linear stays beside it (added after loading); biases and float weights merge as read
    beside = {n for n in (adapter.merges if adapter is not None else ())
              if isinstance(model.get_submodule(n.rpartition(".")[0]), QuantizedLinear)}
    merge_now -= beside
    expected = {n for n, p in model.named_parameters()}
    if ptuning is not None:  # the prefix encoder comes from the P-Tuning checkpoint, not the base one
        expected = {n for n in expected if not n.startswith(PREFIX_ENCODER)}
    quantize_now = {f"{n.rpartition('.')[0]}.weight" for n in expected if n.endswith(".weight_scale")} \
        if quantize and not stored_bits else set()
    seen = set()
    stored_head = None
    # Tensors that are used exactly as stored (same dtype, on the CPU, not quantized now) stay in the file's
    # memory map: see read_safetensors.
    zero_copy = None
    if mmap_enabled() and device_map is None and device.type == "cpu":
        def zero_copy(name, stored_dtype):
            changed = name in quantize_now or name in merge_now
            return not changed and (stored_dtype == dtype or not stored_dtype.is_floating_point)
    files = checkpoint_files(path)
    bar = _progress(sum(map(os.path.getsize, files)), f"Loading {os.path.basename(os.path.normpath(path))}",
                    progress)
    try:
        for filename, name, tensor in ((f, n, t) for f in files for n, t in read_weights(f, zero_copy)):
            bar.update(tensor.numel() * tensor.element_size())
            if name in IGNORED_TENSORS or name.endswith(".attention.rotary_emb.inv_freq"):  # recomputed
                continue
            if name == "lm_head.weight" and config.family == "chatglm1":  # tied to the embedding: checked below
                stored_head = tensor
                continue
            if name not in expected:
                logger.warning("%s: ignoring unexpected tensor %s", path, name)
                continue
            target = device if device_map is None else as_torch_device(device_for(name, device_map))
            if name in merge_now:
                tensor = adapter.apply(name, tensor.to(target), dtype)
            if name in quantize_now:
                # on the target device (a GPU does it in a moment), the same result as quantize() after loading
                q, scale = quantize_weight(tensor.to(device=target, dtype=dtype), bits)
                assign_tensor(model, name, q.to(target), filename)
                name, tensor = name + "_scale", scale
                seen.add(name.removesuffix("_scale"))
            if tensor.is_floating_point():
                # a prefix encoder saved with the model stays float32, as one loaded from a P-Tuning checkpoint
                tensor = tensor.to(device=target, dtype=torch.float32 if name.startswith(PREFIX_ENCODER) else dtype)
            else:
                tensor = tensor.to(device=target)
            assign_tensor(model, name, tensor, filename)
            seen.add(name)
    finally:
        bar.close()  # also on an error: a half-drawn bar would garble the one-line message after it
    missing = sorted(expected - seen)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}; some weight "
                              f"file is missing or belongs to another model")
    for name in sorted(beside):
        layer = model.get_submodule(name.rpartition(".")[0])
        a, b, scaling = adapter.merges[name]
        # float32 whatever the model's dtype, as PEFT keeps an adapter on a half-precision base (and finetune.py
        # trains it): the update is computed as it was trained
        place = dict(device=layer.weight.device, dtype=torch.float32)
        with torch.inference_mode(False), torch.no_grad():
            layer.add_lora(a.to(**place), b.to(**place), scaling)
    if adapter is not None and set(adapter.merges) - beside:
        model.merged_adapter = adapter.path  # model.quantize() warns: the merged update would round away
    if ptuning is not None:
        ptuning.load_into(model, device)  # on the embedding's device, where the prefix is computed
    if stored_head is not None and not model.transformer.word_embeddings.weight.is_meta:
        embedding = model.transformer.word_embeddings.weight
        if not torch.equal(stored_head.to(embedding.device, embedding.dtype), embedding):
            logger.warning("%s: lm_head.weight differs from the word embeddings; ChatGLM-6B ties them and the "
                           "embeddings are used for the output, as in the original", path)
    model.eval()
    if device_map is not None:
        model = dispatch(model, device_map)
    elif device.type == "cpu" and (bits or dtype == torch.bfloat16):
        kernels.library()  # build (or find) the native CPU kernels now, not during the first request
    model.name_or_path = str(name_or_path)
    model.config._name_or_path = str(name_or_path)
    return model


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def from_pretrained(name_or_path: str, model_class_for: ModelClassFor, *, family: str | None = None, dtype=None,
                    device=None, device_map=None, revision: str | None = None, quantize: int | None = None):
    """The model classes' from_pretrained (model_class_for: see load_weights), with Hugging Face's placement rules.

    Neither device nor device_map: on the CPU, as transformers does, so that the original's small-GPU recipe
    `from_pretrained(id).quantize(4).cuda()` never puts the whole float model on the GPU. device_map: a dict
    (module name -> device), a strategy ("auto", "balanced", ...: the layers spread over every CUDA GPU, or
    the one GPU, or the best device there is), or a device ("cuda:0", "cpu", 0).
    """
    from .placement import as_torch_device, auto_device_map

    if device is None and device_map is None:
        device = "cpu"
    elif isinstance(device_map, str) and device_map in DEVICE_MAP_STRATEGIES:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device_map = None
        if gpus >= 2:
            path = resolve_model_dir(name_or_path, revision=revision)
            device_map = auto_device_map(ChatGLMConfig.from_checkpoint_dir(path, family=family), gpus)
        elif device is None:
            device = "cuda" if gpus == 1 else "auto"
    elif isinstance(device_map, (str, int, torch.device)):  # one device for everything
        device, device_map = (device if device is not None else as_torch_device(device_map)), None
    return load_weights(name_or_path, model_class_for, device=device, dtype=dtype, family=family, revision=revision,
                        quantize=quantize, device_map=device_map)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, leave=False)


def load_tokenizer(name_or_path: str, family: str | None = None, revision: str | None = None):
    """The tokenizer of a checkpoint: ChatGLM-6B's (ice_text.model) or ChatGLM2/3's (tokenizer.model); which one
    is ChatGLMTokenizer.from_pretrained's choice (the same for AutoTokenizer)."""
    return ChatGLMTokenizer.from_pretrained(resolve_model_dir(name_or_path, revision=revision, weights=False),
                                            family=family)


# ---- writing ------------------------------------------------------------------------------------
CONFIG_KEYS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "kv_channels", "multi_query_attention",
    "multi_query_group_num", "padded_vocab_size", "seq_length", "rope_ratio", "layernorm_epsilon", "rmsnorm",
    "add_qkv_bias", "add_bias_linear", "post_layer_norm", "apply_residual_connection_post_layernorm",
    "fp32_residual_connection", "original_rope", "apply_query_key_layer_scaling", "attention_softmax_in_fp32",
    "hidden_dropout", "attention_dropout", "quantization_bit", "family", "eos_token_id", "pad_token_id",
)


V1_CONFIG_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "inner_hidden_size", "vocab_size",
                  "layernorm_epsilon", "max_sequence_length", "position_encoding_2d", "bos_token_id", "eos_token_id",
                  "mask_token_id", "gmask_token_id", "pad_token_id", "quantization_bit")


def config_to_json(config: ChatGLMConfig, dtype: torch.dtype) -> dict:
    if config.family == "chatglm1":
        d = {"_name_or_path": config._name_or_path or "local/chatglm1", "model_type": "chatglm",
             "architectures": ["ChatGLMModel"], "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True}
        d.update({k: getattr(config, k) for k in V1_CONFIG_KEYS})
    else:
        d = {"_name_or_path": config._name_or_path or f"local/{config.family}", "model_type": "chatglm",
             "architectures": ["ChatGLMModel"], "torch_dtype": str(dtype).removeprefix("torch."),
             "tie_word_embeddings": False, "use_cache": True}
        d.update({k: getattr(config, k) for k in CONFIG_KEYS})
    if not d["quantization_bit"]:
        del d["quantization_bit"]
    if config.pre_seq_len:  # a P-Tuning v2 prefix: its encoder is saved with the weights
        d.update(pre_seq_len=config.pre_seq_len, prefix_projection=config.prefix_projection)
    return d


def save_checkpoint(model, directory: str, max_shard_size: int = 2 * 1024**3) -> None:
    """config.json + model.safetensors (or shards with model.safetensors.index.json)."""
    from safetensors.torch import save_file

    beside = [n for n, m in model.named_modules() if "lora_A" in m._parameters]
    if beside:  # the checkpoint layout has no place for it: a reload would drop it
        raise ValueError(f"this model carries a LoRA adapter beside its quantized layers ({beside[0]}, ...), which "
                         f"a checkpoint cannot hold: keep the adapter folder and load it with the checkpoint, or "
                         f"save the float model with the adapter merged (loaded without quantization)")
    os.makedirs(directory, exist_ok=True)
    config = model.config
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if config.family == "chatglm1":  # the original layout: a copy of the embedding as lm_head, per-layer inv_freq
        dtype = model.transformer.word_embeddings.weight.dtype
        state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
        r = config.kv_channels // 2
        inv_freq = (1.0 / 10000 ** (torch.arange(0, r, 2).float() / r)).half().to(dtype)
        for i in range(config.num_layers):
            state[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq.clone()
    else:
        dtype = model.transformer.embedding.word_embeddings.weight.dtype
        rot = config.kv_channels // 2
        state[IGNORED_TENSORS[0]] = (1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)).to(dtype)
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    def save(shard, fname):
        # through a temporary name: a model loaded from this directory may still map the old file
        target = os.path.join(directory, fname)
        save_file(shard, target + ".tmp", metadata={"format": "pt"})
        os.replace(target + ".tmp", target)

    if len(shards) == 1:
        save(shards[0], "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save(shard, fname)
            weight_map.update({k: fname for k in shard})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": weight_map}
        with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config_to_json(config, dtype), f, indent=2, ensure_ascii=False)
