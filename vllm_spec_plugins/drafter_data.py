"""Training prompts for a learned drafter, disjoint from every benchmark set.

The benchmark's workloads are HumanEval (code), MT-Bench (chat), ShareGPT,
reasoning-gym's ``gsm_symbolic`` (math) and the generated repetitive
conversations. None of them is used here:

* **code**: functions of the Python standard library on this machine, as
  "complete this function" prompts (the signature and docstring, HumanEval's
  shape, none of its tasks: a function named like a HumanEval entry point is
  left out), and "write a function that ..." from their docstrings' first
  lines;
* **chat**: instructions built from templates and topic lists written for
  this module (explain, compare, advise, write, summarise);
* **math**: reasoning-gym generators *other than* ``gsm_symbolic``
  (arithmetic, equations, fractions, GCD/LCM, counting, time intervals);
  skipped if reasoning-gym is not installed.

:func:`check_disjoint` removes any prompt that also occurs in a benchmark
set that is installed here (exact text) and says how many it removed.

Deterministic in ``seed``. No vLLM imports.
"""

from __future__ import annotations

import ast
import inspect
import random
import sysconfig
from typing import Optional

#: Standard-library modules whose functions make the code prompts.
CODE_MODULES = ("textwrap", "shlex", "fnmatch", "posixpath", "ntpath", "colorsys", "heapq",
                "bisect", "calendar", "statistics", "string", "html", "difflib", "base64",
                "quopri", "uu", "gettext", "locale", "glob", "json.encoder", "json.decoder",
                "urllib.parse", "email.utils", "http.cookies", "csv", "configparser",
                "argparse", "optparse", "pprint", "reprlib", "tokenize", "keyword", "operator",
                "functools", "itertools", "fractions", "decimal", "random", "ipaddress",
                "mimetypes", "shutil", "tempfile", "zipfile", "tarfile", "gzip", "inspect",
                "dataclasses", "enum", "typing", "collections", "copy", "datetime", "uuid",
                "hashlib", "hmac", "secrets", "wave", "sndhdr", "imghdr", "plistlib",
                "netrc", "ftplib", "smtplib", "poplib", "imaplib", "logging", "warnings",
                "traceback", "linecache", "dis", "pickletools", "codecs", "unicodedata",
                "re", "sre_parse", "ast", "symtable", "platform", "sysconfig", "os",
                "subprocess", "threading", "queue", "sched", "selectors", "socket")

TOPICS = ("photosynthesis", "compound interest", "the water cycle", "black holes", "vaccines",
          "inflation", "machine learning", "the French Revolution", "plate tectonics",
          "blockchains", "the immune system", "supply and demand", "climate change",
          "the Roman Empire", "quantum computing", "renewable energy", "the stock market",
          "DNA replication", "the printing press", "volcanoes", "electric cars", "sleep",
          "coral reefs", "the internet", "democracy", "jazz music", "the moon landing",
          "antibiotics", "earthquakes", "recycling", "the Silk Road", "solar panels",
          "public libraries", "honeybees", "the Olympic Games", "rainforests", "tides",
          "credit scores", "remote work", "meditation", "nuclear power", "3D printing",
          "the human heart", "glaciers", "coffee", "the metric system", "bridges",
          "programming languages", "open-source software", "urban gardening", "chess",
          "the Renaissance", "batteries", "cloud computing", "bird migration", "tea",
          "microplastics", "electric guitars", "time zones", "lighthouses", "compilers")
ACTIVITIES = ("learning a new language", "running a first marathon", "saving money",
              "starting a vegetable garden", "preparing for a job interview", "cooking rice",
              "writing a resume", "studying for exams", "travelling on a budget",
              "keeping houseplants alive", "learning to code", "public speaking",
              "organising a small event", "reading more books", "working from home",
              "training a puppy", "taking better photos", "moving to a new city",
              "improving handwriting", "planning a road trip", "staying focused",
              "painting a room", "baking bread", "learning the guitar", "hiking safely")
CHAT_TEMPLATES = (
    "Explain {topic} to a curious twelve-year-old.",
    "What are the main advantages and disadvantages of {topic}?",
    "Write a short blog post introduction about {topic}.",
    "Give me five interesting facts about {topic}.",
    "Summarise the history of {topic} in one paragraph.",
    "How would you describe {topic} to someone who has never heard of it?",
    "Write a haiku and then a limerick about {topic}.",
    "What are common misconceptions about {topic}?",
    "Compare {topic} and {other} in a short table and explain the differences.",
    "Draft a friendly email inviting a colleague to a talk about {topic}.",
    "What tips would you give to someone {activity}?",
    "Make a step-by-step plan for {activity}.",
    "List the mistakes beginners make when {activity} and how to avoid them.",
    "Write a short dialogue between two friends about {activity}.",
    "Write a product description for a gadget that helps with {activity}.",
)
#: reasoning-gym generators used for math prompts (never the benchmark's gsm_symbolic).
MATH_DATASETS = ("basic_arithmetic", "chain_sum", "simple_equations", "fraction_simplification",
                 "gcd", "lcm", "leg_counting", "time_intervals", "decimal_arithmetic",
                 "prime_factorization", "number_sorting", "count_bits")
BENCHMARK_MATH_DATASET = "gsm_symbolic"


def _stdlib_functions(rng: random.Random) -> list[tuple[str, str]]:
    """(signature + docstring source, docstring first line) of top-level
    functions with docstrings in CODE_MODULES' files."""
    import importlib

    out = []
    for name in CODE_MODULES:
        try:
            mod = importlib.import_module(name)
            path = inspect.getsourcefile(mod)
            if not path or not path.startswith(sysconfig.get_paths()["stdlib"]):
                continue
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except Exception:
            continue
        nodes = list(tree.body)
        for cls in tree.body:  # and the methods of top-level classes
            if isinstance(cls, ast.ClassDef) and not cls.name.startswith("_"):
                nodes += cls.body
        for node in nodes:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 20:
                continue
            args = ast.unparse(node.args)
            doc = doc.strip().replace('"""', "'''")
            if len(doc) > 600:
                doc = doc[:600].rsplit("\n", 1)[0]
            sig = f"def {node.name}({args}):\n    \"\"\"{doc}\n    \"\"\"\n"
            out.append((sig, doc.split("\n")[0].strip().rstrip(".")))
    rng.shuffle(out)
    return out


def benchmark_function_names() -> set[str]:
    """HumanEval's entry points (where installed): a standard-library
    function of the same name (``median``, ``encode``) is left out, so no
    code prompt asks for a benchmark task under another wording."""
    try:
        from vllm_spec_plugins.bench.workloads import load_humaneval

        return {m.get("entry_point") for m in load_humaneval(None, 0).meta} - {None, ""}
    except Exception:
        return set()


def code_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(f"code:{seed}")
    taken = benchmark_function_names()
    funcs = [f for f in _stdlib_functions(rng)
             if f[0][4:].split("(", 1)[0] not in taken]
    out = []
    for i, (sig, first) in enumerate(funcs):
        if len(out) >= n:
            break
        if i % 3 == 2 and first:
            out.append(f"Write a Python function that does the following: {first[0].lower()}"
                       f"{first[1:]}. Include a docstring and a short example.")
        else:
            out.append("Complete the following Python function. Return the whole function "
                       f"in a code block.\n\n```python\n{sig}```")
    return out


def chat_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(f"chat:{seed}")
    out, seen = [], set()
    tries = 0
    while len(out) < n and tries < 50 * n + 100:
        tries += 1
        t = rng.choice(CHAT_TEMPLATES)
        p = t.format(topic=rng.choice(TOPICS), other=rng.choice(TOPICS),
                     activity=rng.choice(ACTIVITIES))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def math_prompts(n: int, seed: int) -> list[str]:
    try:
        import reasoning_gym
    except ImportError:
        return []
    rng = random.Random(f"math:{seed}")
    per = max(1, -(-n // len(MATH_DATASETS)))
    out = []
    for name in MATH_DATASETS:
        assert name != BENCHMARK_MATH_DATASET
        try:
            ds = reasoning_gym.create_dataset(name, seed=rng.getrandbits(31), size=per)
            out += [f"{ds[i]['question']}\n\nExplain your reasoning step by step, then give "
                    "the final answer." for i in range(per)]
        except Exception:
            continue
    rng.shuffle(out)
    return out[:n]


def benchmark_prompt_texts() -> set[str]:
    """The user prompts of the benchmark sets installed here (HumanEval,
    MT-Bench turns): what training prompts must not equal."""
    texts: set[str] = set()
    try:
        from vllm_spec_plugins.bench import workloads as wl

        for loader in (wl.load_humaneval, wl.load_mtbench):
            try:
                w = loader(None, 0)
            except Exception:
                continue
            for conv in w.prompts:
                for m in conv:
                    if m.get("role") == "user":
                        texts.add(m["content"].strip())
    except Exception:
        pass
    return texts


def check_disjoint(prompts: list[str]) -> tuple[list[str], int]:
    """``prompts`` less any that equals a benchmark prompt; and how many were removed."""
    bench = benchmark_prompt_texts()
    kept = [p for p in prompts if p.strip() not in bench]
    return kept, len(prompts) - len(kept)


def training_prompts(n: int, seed: int = 0, mix: Optional[dict] = None) -> list[str]:
    """``n`` prompts: by default 40% code, 40% chat, 20% math (math's share
    goes to chat when reasoning-gym is absent), shuffled."""
    mix = mix or {"code": 0.4, "chat": 0.4, "math": 0.2}
    n_code = int(round(n * mix.get("code", 0)))
    n_math = int(round(n * mix.get("math", 0)))
    code = code_prompts(n_code, seed)
    math_ = math_prompts(n_math, seed)
    chat = chat_prompts(n - len(code) - len(math_), seed)
    out = code + chat + math_
    random.Random(f"mix:{seed}").shuffle(out)
    return out


DATA_NOTE = ("prompts from drafter_data.py: Python standard-library functions (complete / "
             "write), template chat instructions, reasoning-gym generators other than "
             "gsm_symbolic; answers generated greedily by the target itself; none equal to "
             "a HumanEval or MT-Bench prompt")
