"""Prompt templates of the node roles, per task style.

A node's prompt depends on its role and on whether it has predecessors:

* ``assistant`` with no predecessors answers the question from scratch;
* ``assistant`` with predecessors synthesises their responses into one better response
  (Mixture-of-Agents style);
* ``fuser`` reviews, condenses and merges its predecessors' responses, keeping the best
  steps and the final-answer format.

Every template ends with the task's final-answer format (``{answer_format}``), so any
node's output can be scored, not only the sink's. Templates are ``str.format`` strings
over ``{question}``, ``{responses}`` (the predecessors' outputs, numbered) and
``{answer_format}``; a spec overrides any of them under ``task.prompts``.

A role users define (the spec's ``roles`` section) has one template over ``{question}``,
``{inputs}`` (the predecessors' outputs, numbered as ``{responses}`` are) and
``{answer_format}``; when it does not place ``{answer_format}`` itself, the final-answer
instruction is appended after a blank line, as every built-in template ends with it.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from graphtune.errors import SpecError

ASSISTANT_TEMPLATE = "{question}\n\n{answer_format}"

SYNTHESIZE_TEMPLATE = (
    "You have been given responses from several assistants to the question below. Critically evaluate "
    "them (some may be wrong), then write one better response of your own.\n\n"
    "Question:\n{question}\n\n{responses}\n\n{answer_format}"
)

FUSER_TEMPLATE = (
    "Review the candidate responses to the question below. Keep the correct steps, drop the mistakes, "
    "and merge them into one concise final response.\n\n"
    "Question:\n{question}\n\n{responses}\n\n{answer_format}"
)

RESPONSE_TEMPLATE = "Response {index}:\n{response}"

#: the final-answer instruction per task style
ANSWER_FORMATS: dict[str, str] = {
    "math": "Solve the problem step by step, then give the final answer on the last line as "
            "\"The answer is <number>\".",
    "latex": "Solve the problem step by step, then give the final answer in \\boxed{}.",
    "choice": "Think briefly, then give the letter of the correct option on the last line as \"Answer: <letter>\".",
    "code": "Write the complete Python function in one ```python code block.",
    "text": "Give a short, direct final answer on the last line.",
}

#: task style implied by a scorer or dataset-preset name (anything else: "text")
STYLE_OF: dict[str, str] = {
    "gsm8k": "math", "number": "math", "numeric": "math", "llm_judge": "text",
    "math": "latex", "math500": "latex", "boxed": "latex", "latex": "latex",
    "mmlu": "choice", "choice": "choice", "multiple_choice": "choice", "letter": "choice",
    "humaneval": "code", "mbpp": "code", "code": "code", "python": "code",
    "exact": "text", "exact_match": "text", "contains": "text", "text": "text",
}

SYSTEM_PROMPT = "You are a careful, helpful assistant."

_FIELDS = ("system", "assistant", "synthesize", "fuser", "answer_format", "response")


@dataclass(frozen=True)
class PromptSet:
    """The templates of one task. ``system`` may be empty (no system message)."""

    style: str = "text"
    system: str = SYSTEM_PROMPT
    assistant: str = ASSISTANT_TEMPLATE
    synthesize: str = SYNTHESIZE_TEMPLATE
    fuser: str = FUSER_TEMPLATE
    answer_format: str = ANSWER_FORMATS["text"]
    response: str = RESPONSE_TEMPLATE
    #: custom roles: (name, template with {answer_format} placed: see :func:`role_template`)
    roles: tuple[tuple[str, str], ...] = ()

    def template_of(self, role: str, has_inputs: bool) -> str:
        """The template of a node of ``role`` with or without inputs."""
        if role == "fuser":
            if not has_inputs:
                raise ValueError("a fuser needs at least one predecessor response")
            return self.fuser
        if role == "assistant":
            return self.synthesize if has_inputs else self.assistant
        for name, template in self.roles:
            if name == role:
                return template
        known = ", ".join(["assistant", "fuser", *(n for n, _ in self.roles)])
        raise ValueError(f"role {role!r} has no prompt template; known roles: {known}")

    def messages(self, role: str, question: str, responses: Sequence[str] = ()) -> list[dict[str, str]]:
        """Chat messages of one node: its role, the question and its predecessors'
        outputs (in a fixed order)."""
        template = self.template_of(role, bool(responses))
        block = "\n\n".join(self.response.format(index=i + 1, response=r.strip()) for i, r in enumerate(responses))
        user = template.format(question=question.strip(), responses=block, inputs=block,
                               answer_format=self.answer_format)
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": user})
        return msgs


def style_for(name: str | None) -> str:
    """The prompt style of a scorer or dataset preset name (``text`` when unknown)."""
    if not name:
        return "text"
    return STYLE_OF.get(name.lower().replace("-", "_"), "text")


def default_prompts(style: str) -> PromptSet:
    if style not in ANSWER_FORMATS:
        raise SpecError(f"unknown prompt style {style!r}; known styles: {', '.join(ANSWER_FORMATS)}")
    return PromptSet(style=style, answer_format=ANSWER_FORMATS[style])


def role_template(template: str) -> str:
    """A custom role's template as it is sent: ``{answer_format}`` appended after a blank
    line unless the template places it."""
    names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    return template if "answer_format" in names else template.rstrip() + "\n\n{answer_format}"


def build_prompts(style: str | None = None, overrides: Mapping[str, str | None] | None = None, *,
                  scorer: str | None = None, preset: str | None = None,
                  roles: Mapping[str, str] | None = None) -> PromptSet:
    """Defaults for ``style`` (or the style implied by the scorer / preset), with the
    non-empty ``overrides`` applied, and the templates of the custom ``roles`` (name ->
    template over ``{question}``, ``{inputs}``, ``{answer_format}``). A template that names
    an unknown placeholder is a ``SpecError`` before anything runs."""
    if not style:
        style = style_for(scorer)
        if style == "text":
            style = style_for(preset)
    ps = default_prompts(style)
    over = {k: v for k, v in (overrides or {}).items() if v is not None and k != "style"}
    unknown = sorted(set(over) - set(_FIELDS))
    if unknown:
        raise SpecError(f"task.prompts: unknown template(s) {unknown}; allowed: {', '.join(_FIELDS)}")
    ps = replace(ps, **over)
    if roles:
        ps = replace(ps, roles=tuple((name, role_template(t)) for name, t in roles.items()))
    _check(ps)
    return ps


def _check(ps: PromptSet) -> None:
    sample = dict(question="q", responses="r", answer_format="f", index=1, response="x")
    for name in ("assistant", "synthesize", "fuser", "response"):  # system, answer_format: verbatim
        text = getattr(ps, name)
        try:
            text.format(**sample)
        except (KeyError, IndexError, ValueError) as e:
            allowed = "{index}, {response}" if name == "response" else "{question}, {responses}, {answer_format}"
            raise SpecError(f"task.prompts.{name}: bad placeholder {e} in the template; allowed: {allowed} "
                            "(write literal braces as {{ and }})") from None
    for name, text in ps.roles:
        try:
            text.format(question="q", inputs="r", answer_format="f")
        except (KeyError, IndexError, ValueError) as e:
            raise SpecError(f"roles.{name}.prompt: bad placeholder {e} in the template; allowed: {{question}}, "
                            "{inputs}, {answer_format} (write literal braces as {{ and }})") from None


# -- the question text of a pipeline stage ---------------------------------------------------

#: the heading above an input stage's answer in a stage's default question text
#: (:func:`stage_question`); ``{stage}`` is the input stage's name
STAGE_INPUT_HEADING = "Output of the {stage} stage:"


def stage_question(template: str | None, question: str | None, inputs: Mapping[str, str],
                   order: Sequence[str] | None = None) -> str:
    """The text a pipeline stage's graph is given as its question: what the live
    environment sends and what an exported LangGraph module builds (the one definition
    both use; the export copies this function's source into the module, so it must stay
    self-contained: only ``STAGE_INPUT_HEADING`` and builtins).

    ``question`` is the task's question; ``inputs`` maps each input stage's name to its
    final answer; ``order`` is the stage's inputs in the spec's order (``"question"`` and
    stage names; default: the question, then ``inputs`` in their order). ``template`` is
    the spec's ``pipeline.stages[i].prompt``: a ``str.format`` template over
    ``{question}`` and the input stages' names. Without one, the inputs come in ``order``,
    the question as it is and each input stage's answer under the heading
    ``STAGE_INPUT_HEADING``, blocks separated by a blank line (a stage that does not read
    the question leaves it out of ``order``). Texts are stripped. A template naming
    anything else raises ``KeyError`` naming the placeholder and what it may name."""
    if order is None:
        order = (["question"] if question is not None else []) + [name for name in inputs if name != "question"]
    if template is None:
        blocks = []
        for name in order:
            if name == "question":
                blocks.append((question or "").strip())
            else:
                blocks.append(STAGE_INPUT_HEADING.format(stage=name) + "\n" + (inputs[name] or "").strip())
        return "\n\n".join(blocks)
    values = {name: (answer or "").strip() for name, answer in inputs.items()}
    values["question"] = (question or "").strip()
    try:
        return template.format(**values)
    except (KeyError, IndexError) as e:
        what = e.args[0] if isinstance(e, KeyError) else "a positional field"
        raise KeyError(f"stage prompt template names {{{what}}}, which is neither the question nor an input "
                       f"stage; it may name {', '.join('{' + k + '}' for k in values)}") from None
