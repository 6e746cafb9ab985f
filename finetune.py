"""Fine-tune ChatGLM with LoRA or P-Tuning v2 on JSONL conversations, in one command:

    python finetune.py --model DIR --data train.jsonl [--eval eval.jsonl] --method lora|ptuning --output OUT

Each line of the data is a ChatGLM3 conversation, {"conversations": [{"role": "system"|"user"|"assistant"|
"observation", "content": "...", "tools"?: [...] (system), "metadata"?: "..." (assistant), "loss"?: false}], "tools"?: [...]},
or a ChatGLM2 example, {"prompt": "...", "response": "...", "history"?: [["q", "a"], ...]}. The context is
the family's prompt format (model.formats); the loss counts the assistant replies and the token that ends each
(eos, or ChatGLM3's next role token) only, as the original examples; a ChatGLM2 example trains its response.

Saves: lora -> peft's save_pretrained (adapter_config.json + adapter_model.safetensors); ptuning -> a folder
with pytorch_model.bin (only transformer.prefix_encoder.*) and ptuning.json (pre_seq_len, prefix_projection),
which load_model(base, ptuning=OUT), --ptuning-checkpoint OUT and the original's scripts read. Both also
train on a quantized base model (a pre-quantized checkpoint such as chatglm2-6b-int4, or --quantize 4|8 as the
original's --quantization_bit): the gradients go through the frozen int4 / int8 layers (model/quantization.py).
LoRA there trains A and B beside each quantized linear (QLoRA; QuantizedLinear.add_lora, in float32) and saves
them in peft's format too; --adapter OUT serves them on the quantized model the same way, unmerged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

ROLES = ("system", "user", "assistant", "observation")
DEFAULT_LR = {"lora": 2e-4, "ptuning": 2e-2}  # ChatGLM2's ptuning train.sh used 2e-2
LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


class DataError(ValueError):
    """What finetune.py cannot start with: a bad line of the data (the message names the file and line), a
    missing file, a model that does not load, a method the model has not."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where the loss does not count

    @property
    def trained_tokens(self) -> int:
        return sum(1 for x in self.labels if x != -100)


# ---- data -----------------------------------------------------------------------------------------------
def messages_of(record) -> list:
    """The model.formats Messages of one JSON record (either format), each with a `train` flag; ValueError
    saying what is wrong."""
    from model.formats import DEFAULT_TOOL_PROMPT, Message

    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        conversation = record["conversations"]
        if not isinstance(conversation, list) or not conversation:
            raise ValueError('"conversations" must be a non-empty list of messages')
        messages = []
        if record.get("tools"):  # the original ChatGLM3 examples' top-level tools: a system message offers them
            if not isinstance(record["tools"], list):
                raise ValueError('"tools" must be a list of function definitions')
            messages.append(Message("system", DEFAULT_TOOL_PROMPT, tools=record["tools"]))
        for i, item in enumerate(conversation):
            where = f"message {i + 1}"
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected an object with role and content")
            role = item.get("role")
            if role is None:
                raise ValueError(f'{where}: missing "role"')
            if role not in ROLES:
                raise ValueError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
            if not isinstance(item.get("content"), str):
                raise ValueError(f'{where}: missing "content" (a string)' if "content" not in item
                                 else f'{where}: "content" must be a string')
            tools = item.get("tools")
            if tools is not None and (role != "system" or not isinstance(tools, list)):
                raise ValueError(f'{where}: "tools" must be a list, on a system message')
            metadata = item.get("metadata") or ""
            if not isinstance(metadata, str):
                raise ValueError(f'{where}: "metadata" must be a string')
            message = Message(role, item["content"], metadata=metadata if role == "assistant" else "",
                              tools=tools or None)
            message.train = role == "assistant" and item.get("loss", True) is not False
            message.number = i + 1  # its place in the file's conversation, for errors
            messages.append(message)
        return messages
    missing = [k for k in ("prompt", "response") if k not in record]
    if missing:
        raise ValueError('expected "conversations" (ChatGLM3) or "prompt" and "response" (ChatGLM2); missing '
                         + ", ".join(f'"{k}"' for k in missing))
    history = record.get("history") or []
    if not isinstance(history, list) or not all(
            isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
        raise ValueError('"history" must be a list of [question, answer] pairs of strings')
    for key in ("prompt", "response"):
        if not isinstance(record[key], str):
            raise ValueError(f'"{key}" must be a string')
    messages = []
    for q, a in history:
        messages += [Message("user", q), Message("assistant", a)]
        messages[-1].train = False  # as the original ptuning main.py: the history is prompt, the response trained
    messages += [Message("user", record["prompt"]), Message("assistant", record["response"])]
    messages[-1].train = True
    return messages


def reply_ids(tokenizer, family: str, message) -> list[int]:
    """The ids the model writes for an assistant message after its prompt (without the ending token)."""
    if family == "chatglm3":  # <|assistant|> ends the prompt; then 'metadata\n' and the content
        return tokenizer.build_single_message("assistant", message.metadata, message.content)[1:]
    return tokenizer.encode(message.content, add_special_tokens=False)


def tokenize(tokenizer, messages: list) -> Example:
    """input_ids and labels of a conversation: each trained assistant reply after its context (the family's
    prompt_ids), labelled with the token that ends it; later turns extend the same sequence when the format
    allows it (ChatGLM3), else the sequence restarts at the last trained reply's context (ChatGLM2 and
    ChatGLM-6B re-read the history as prompt text)."""
    from model.formats import ConversationError, format_for

    family = tokenizer.family
    fmt = format_for(family)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    trained = [k for k, m in enumerate(messages) if getattr(m, "train", False)]
    if not trained:
        raise ValueError("no assistant message to train on")
    for k in trained:
        number = getattr(messages[k], "number", k + 1)
        if not any(m.role in ("user", "observation") for m in messages[:k]):
            raise ValueError(f"message {number}: an assistant reply must follow a user message")
        try:
            context = fmt.prompt_ids(tokenizer, messages[:k])
        except ConversationError as e:
            raise ValueError(f"message {number}: {e}") from None
        if ids and context[:len(ids)] == ids:  # the next turn's first token ends the previous reply
            new = context[len(ids):]
            labels += new[:1] + [-100] * (len(new) - 1)
        else:
            new, labels = context, [-100] * len(context)
            ids = []
        reply = reply_ids(tokenizer, family, messages[k])
        ids += new + reply
        labels += reply
    ids.append(eos)
    labels.append(eos)
    return Example(ids, labels)


def read_data(path: str, tokenizer, max_length: int) -> list[Example]:
    """The examples of a JSONL file (blank lines skipped); DataError naming the file and line of a bad one."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    examples = []
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
            try:
                example = tokenize(tokenizer, messages_of(record))
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            if len(example.input_ids) > max_length:
                raise DataError(f"{path}:{lineno}: the conversation is {len(example.input_ids)} tokens, longer "
                                f"than --max-length {max_length}; shorten it or raise --max-length")
            examples.append(example)
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def collate(examples: list[Example], pad_id: int):
    """Right-padded (input_ids, labels) tensors: padding comes after every real token, so causal attention
    needs no mask, and its labels are -100."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, :len(e.labels)] = torch.tensor(e.labels)
    return ids, labels


def batches(examples: list[Example], batch_size: int, rng: random.Random | None):
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    return [[examples[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


# ---- the model --------------------------------------------------------------------------------------------
def training_dtype(name: str, device):
    """auto: bf16 on GPUs that have it (else fp16), float32 on CPUs; fp16 only on GPUs."""
    import torch

    from model.loading import DTYPE_NAMES

    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = DTYPE_NAMES[name.removeprefix("torch.")]
    if dtype == torch.float16 and device.type == "cpu":
        raise DataError("--dtype float16 trains on GPUs only; use float32 or bfloat16 on the CPU")
    return dtype


def prepare(model, args):
    """The model ready to train with args.method: every base weight frozen; LoRA adapters (peft) or a new
    prefix encoder the only trainable parameters. Returns the model to call (a PeftModel for LoRA on a float
    model; on a quantized one the model itself, its LoRA beside the quantized linears)."""
    model.requires_grad_(False)
    if args.method == "lora" and quantized_targets(model):
        add_trainable_lora(model, args)
    elif args.method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, config)
    else:
        model.add_prefix_encoder(args.pre_seq_len, args.prefix_projection).requires_grad_(True)
    if args.gradient_checkpointing:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable()
    model.train()
    return model


def quantized_targets(model) -> dict:
    """name -> QuantizedLinear of the LoRA targets (LORA_TARGETS) of a quantized model; empty for a float one."""
    from model.quantization import QuantizedLinear

    return {name: module for name, module in model.named_modules()
            if isinstance(module, QuantizedLinear) and name.rpartition(".")[2] in LORA_TARGETS}


def add_trainable_lora(model, args) -> None:
    """LoRA (rank args.lora_rank) beside every quantized target linear, initialised as peft does: A from
    kaiming_uniform(a=sqrt(5)), B zero, so that training starts from the base model; float32 (peft's default for
    the adapter of a half-precision model), on the layer's device."""
    import torch

    for layer in quantized_targets(model).values():
        a = torch.empty(args.lora_rank, layer.in_features, dtype=torch.float32, device=layer.weight.device)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        b = torch.zeros(layer.out_features, args.lora_rank, dtype=torch.float32, device=layer.weight.device)
        layer.add_lora(a, b, args.lora_alpha / args.lora_rank, trainable=True, dropout=args.lora_dropout)


def save_quantized_lora(model, args) -> None:
    """The LoRA trained beside quantized linears, in the folder layout peft's save_pretrained writes
    (adapter_config.json, adapter_model.safetensors with base_model.model.<module>.lora_A / lora_B.weight)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, layer in quantized_targets(model).items():
        for part in ("A", "B"):
            tensors[f"base_model.model.{name}.lora_{part}.weight"] = \
                getattr(layer, f"lora_{part}").detach().float().cpu().contiguous()
    save_file(tensors, os.path.join(args.output, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": args.model,
              "r": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
              "target_modules": LORA_TARGETS, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "inference_mode": True}
    with open(os.path.join(args.output, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
        f.write("\n")


def save(model, args) -> None:
    os.makedirs(args.output, exist_ok=True)
    if args.method == "lora" and quantized_targets(model):
        save_quantized_lora(model, args)
        return
    if args.method == "lora":
        model.save_pretrained(args.output)
        return
    import torch

    state = {f"transformer.prefix_encoder.{k}": v.detach().float().cpu()
             for k, v in model.transformer.prefix_encoder.state_dict().items()}
    torch.save(state, os.path.join(args.output, "pytorch_model.bin"))
    with open(os.path.join(args.output, "ptuning.json"), "w", encoding="utf-8") as f:
        json.dump({"base": args.model, "pre_seq_len": args.pre_seq_len,
                   "prefix_projection": args.prefix_projection}, f, indent=1)
        f.write("\n")


def evaluate(model, examples: list[Example], batch_size: int, pad_id: int, device) -> float:
    """Mean loss per trained token over examples."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches(examples, batch_size, None):
            ids, labels = collate(batch, pad_id)
            n = int((labels[:, 1:] != -100).sum())
            loss = model(input_ids=ids.to(device), labels=labels.to(device), use_cache=False).loss
            total += float(loss) * n
            count += n
    model.train()
    return total / max(count, 1)


def train(model, data: list[Example], eval_data: list[Example] | None, args, device, log) -> list[float]:
    """The training loop (AdamW, linear decay); the loss of each step."""
    import torch
    from tqdm import tqdm

    steps_per_epoch = math.ceil(len(data) / args.batch_size)
    total = args.max_steps or steps_per_epoch * args.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total))
    scaler = torch.amp.GradScaler("cuda") if args.torch_dtype == torch.float16 else None
    pad_id = args.pad_id
    rng = random.Random(args.seed)
    losses: list[float] = []
    bar = tqdm(total=total, desc="training", unit="step", disable=args.quiet, dynamic_ncols=True)
    step, epoch, tokens, started = 0, 0, 0, time.perf_counter()
    while step < total:
        epoch += 1
        for batch in batches(data, args.batch_size, rng):
            if step >= total:
                break
            ids, labels = collate(batch, pad_id)
            loss = model(input_ids=ids.to(device), labels=labels.to(device), use_cache=False).loss
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            step += 1
            tokens += sum(len(e.input_ids) for e in batch)
            losses.append(loss.item())
            rate = tokens / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}", tok_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
        if eval_data is not None:
            bar.clear()
            log(f"epoch {epoch}: step {step}/{total}, train loss {losses[-1]:.4f}, eval loss "
                f"{evaluate(model, eval_data, args.batch_size, pad_id, device):.4f}")
    bar.close()
    elapsed = time.perf_counter() - started
    log(f"trained {step} steps, {tokens} tokens in {elapsed:.1f} s ({tokens / max(elapsed, 1e-9):.0f} tokens/s), "
        f"final loss {losses[-1]:.4f}")
    return losses


# ---- the command --------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    from model.flags import device_name, dtype_name, float_range, int_range

    positive = int_range(1)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="base checkpoint directory or Hub id")
    ap.add_argument("--data", required=True, help="training data, JSONL")
    ap.add_argument("--eval", default=None, help="evaluation data, JSONL: its loss is printed after each epoch")
    ap.add_argument("--method", required=True, choices=("lora", "ptuning"))
    ap.add_argument("--output", required=True, help="folder to save the adapter / prefix in")
    ap.add_argument("--quantize", type=int, choices=(4, 8), default=None,
                    help="quantize the frozen base model to int4 / int8 while loading (a pre-quantized "
                         "checkpoint such as chatglm2-6b-int4 needs no flag)")
    ap.add_argument("--pre-seq-len", type=positive, default=128, help="P-Tuning v2 prefix tokens (default 128)")
    ap.add_argument("--prefix-projection", action="store_true", help="P-Tuning v2 with the MLP reparametrization")
    ap.add_argument("--lora-rank", type=positive, default=8)
    ap.add_argument("--lora-alpha", type=float_range(0, low_open=True), default=32.0)
    ap.add_argument("--lora-dropout", type=float_range(0, 1), default=0.1)
    length = ap.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=positive, default=None, help="passes over the data (default 3)")
    length.add_argument("--max-steps", type=positive, default=None, help="optimizer steps, instead of --epochs")
    ap.add_argument("--lr", type=float_range(0, low_open=True), default=None,
                    help="learning rate (default: lora 2e-4, ptuning 2e-2)")
    ap.add_argument("--max-length", type=positive, default=1024, help="longest conversation in tokens")
    ap.add_argument("--batch-size", type=positive, default=4)
    ap.add_argument("--max-grad-norm", type=float_range(0, low_open=True), default=1.0)
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    ap.add_argument("--dtype", default="auto", type=dtype_name,
                    help="auto (bf16 or fp16 on GPUs, float32 on CPUs), float32, bfloat16, float16 (GPUs)")
    ap.add_argument("--device", default="auto", type=device_name, metavar="{auto,cuda,cuda:N,mps,cpu}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.lr = args.lr or DEFAULT_LR[args.method]
    if args.max_steps is None and args.epochs is None:
        args.epochs = 3

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        import torch

        from model.flags import ModelLoadError, load_from_args
        from model.loading import pick_device

        torch.manual_seed(args.seed)
        device = pick_device(args.device)
        args.torch_dtype = training_dtype(args.dtype, device)
        # the model's flags as the scripts read them, so load errors read as theirs (one line, exit status 2)
        load_args = argparse.Namespace(model=args.model, device=str(device), dtype=args.torch_dtype,
                                       quantize=args.quantize,
                                       num_gpus=1, ptuning_checkpoint=None, pre_seq_len=None)
        try:
            model, tokenizer = load_from_args(load_args)
        except ModelLoadError as e:
            raise DataError(str(e)) from None
        data = read_data(args.data, tokenizer, args.max_length)
        eval_data = read_data(args.eval, tokenizer, args.max_length) if args.eval else None
        args.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model = prepare(model, args)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"{args.method}: {trainable} trainable parameters; {len(data)} examples, "
            f"{sum(e.trained_tokens for e in data)} trained tokens; {args.torch_dtype} on {device}")
        train(model, data, eval_data, args, device, log)
        save(model, args)
        log(f"saved to {args.output}")
    except DataError as e:
        print(f"finetune.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
