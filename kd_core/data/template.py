"""The prompt template: the one place that turns a row into a prompt.

`alpaca` is the Dolly/Alpaca format used by MiniLLM, DistiLLM and the OKD paper for training and
evaluation. `minimal` keeps the section markers but drops the preamble: at tiny scale the preamble's ~30
tokens per example would dominate training time. `chatml` is the chat format of instruction-tuned
checkpoints such as SmolLM2-Instruct and Qwen (a user turn, then the assistant's); their tokenizers end
the response with `<|im_end|>` as EOS. The loss covers the response tokens only; the prompt is
context.
"""

from __future__ import annotations

_ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
_ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_MINIMAL_WITH_INPUT = "### Instruction:\n{instruction}\n### Input:\n{context}\n### Response:\n"
_MINIMAL_NO_INPUT = "### Instruction:\n{instruction}\n### Response:\n"

_CHATML_WITH_INPUT = "<|im_start|>user\n{instruction}\n\n{context}<|im_end|>\n<|im_start|>assistant\n"
_CHATML_NO_INPUT = "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n"

TEMPLATES: dict[str, tuple[str, str]] = {
    "alpaca": (_ALPACA_WITH_INPUT, _ALPACA_NO_INPUT),
    "minimal": (_MINIMAL_WITH_INPUT, _MINIMAL_NO_INPUT),
    "chatml": (_CHATML_WITH_INPUT, _CHATML_NO_INPUT),
}


def format_prompt(row: dict, template: str) -> str:
    """The prompt for a row with keys instruction and (optional) context; ends where the response starts."""
    with_input, no_input = TEMPLATES[template]
    context = (row.get("context") or "").strip()
    fmt = with_input if context else no_input
    return fmt.format(instruction=row["instruction"].strip(), context=context)


def prompt_key(row: dict) -> tuple[str, str]:
    """What makes two rows the same prompt: (instruction, context), each whitespace-normalised (runs of
    whitespace -> one space, stripped). Decontamination and the unlabeled pool's disjointness compare these."""
    return " ".join(row["instruction"].split()), " ".join((row.get("context") or "").split())


def chat_template(template: str) -> str:
    """The Jinja chat template that renders `messages` as `format_prompt` renders a row: the last user message
    is the instruction (its optional `context` key the input), and the prompt ends where the response starts.
    Saved in the run's tokenizer, so `tokenizer.apply_chat_template` and `pipeline("text-generation")` on chat
    messages give the prompts the model was trained and evaluated on."""
    with_input, no_input = TEMPLATES[template]

    def jinja(fmt: str) -> str:
        return fmt.replace("{instruction}", "{{ m['content'] | trim }}").replace("{context}", "{{ m['context'] | trim }}")
    return ("{%- set m = (messages | selectattr('role', 'equalto', 'user') | list)[-1] -%}"
            "{%- if m.get('context') and m['context'] | trim %}" + jinja(with_input) + "{% else %}"
            + jinja(no_input) + "{% endif %}")  # (no `-` where a prompt's final newline would be trimmed)
