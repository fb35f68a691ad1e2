"""`gavel chat`: an interactive guarded conversation in the terminal, streamed token by token."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from gavel.cli.common import ModelOpt, console, user_errors


def chat(bank: Annotated[Path, typer.Option("--bank", "-b", help="A CE bank folder (gavel ce fit).")],
         rules: Annotated[list[Path], typer.Option("--rules", "-r", help="Rule files or folders.")],
         model: ModelOpt = "builtin:organism",
         system: Annotated[str, typer.Option(help="A system message to start with.")] = "",
         max_new_tokens: Annotated[int, typer.Option(help="Tokens per reply.")] = 64,
         temperature: Annotated[float, typer.Option(help="0 decodes greedily.")] = 0.0) -> None:
    """Talk to a guarded model: each reply streams token by token once the rules have seen it,
    then every rule that fired is listed; a blocked reply is replaced by the rule's reply. An empty line or end of
    input quits."""
    from gavel.models.loading import load_model
    from gavel.runtime.guard import Guard

    with user_errors():
        guard = Guard(load_model(model), bank, [str(r) for r in rules])
    conversation = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            text = console.input("[bold]you>[/] ")
        except EOFError:
            break
        if not text.strip():
            break
        conversation.append({"role": "user", "content": text})
        console.print("[bold]model>[/] ", end="")
        result = None
        for step in guard.stream(conversation, max_new_tokens=max_new_tokens, temperature=temperature):
            if step.result is not None:
                result = step.result
            elif not step.blocked:
                console.print(escape(step.token), end=" ", soft_wrap=True)
        assert result is not None, "a stream's last step carries its result"
        console.print(f"\n[red]\\[blocked][/] {escape(result.text)}" if result.blocked else "")
        for e in result.events:
            where = "prompt" if e.token_index < result.record.prompt_length else "reply"
            console.print(f"[yellow]rule {escape(e.rule)} ({e.action}) fired at {where} token {e.token_index} "
                          f"{escape(repr(e.token))}[/]")
        console.print(f"[dim]verdict: {result.verdict}[/]")
        conversation.append({"role": "assistant", "content": result.text})
