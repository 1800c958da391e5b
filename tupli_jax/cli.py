"""The ``tupli-jax`` command: record jumanji envs into a store, list, show, export, verify, delete.

Every error (unknown env id, bad filter, missing store, unknown id) prints one line to stderr and
exits with status 1, never a traceback.

Example:
    $ tupli-jax record Game2048-v1 --num-envs 64 --steps 20000
    $ tupli-jax list episodes --filter 'metadata.seed>=0' --json
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from tupli_jax.schema import (
    BaseFilter,
    FilterAND,
    FilterEQ,
    FilterGEQ,
    FilterGT,
    FilterIN,
    FilterLEQ,
    FilterLT,
    FilterNE,
)
from tupli_jax.storage.base import TupliStorageError

__all__ = ["app", "main", "parse_filter"]

DEFAULT_STORE = "tupli_store"

app = typer.Typer(
    help="Record RL environments on device into an embedded offline-RL store, and query it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class CliError(Exception):
    """An error reported to the user as one line."""


@contextmanager
def _one_line_errors() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:  # the reader left (``| head``): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit flush
        raise typer.Exit(code=1) from None
    except (CliError, TupliStorageError, ValueError, TypeError, KeyError, OSError) as e:
        typer.echo(f"error: {_first_line(e)}", err=True)
        raise typer.Exit(code=1) from None
    except Exception as e:  # anything else still ends in one line, naming the exception type
        typer.echo(f"error: {type(e).__name__}: {_first_line(e)}", err=True)
        raise typer.Exit(code=1) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


_OPERATORS: list[tuple[str, Callable[..., BaseFilter]]] = [
    (">=", FilterGEQ),
    ("<=", FilterLEQ),
    ("!=", FilterNE),
    ("==", FilterEQ),
    (">", FilterGT),
    ("<", FilterLT),
    ("=", FilterEQ),
]
_KEY = re.compile(r"^[A-Za-z0-9_.-]+$")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_filter(expressions: list[str]) -> BaseFilter | None:
    """Parses ``KEY OP VALUE`` expressions (AND-ed) into a filter.

    OP is one of ``>= <= != == = > <`` or `` in ``; VALUE is JSON when it parses as JSON
    (``3``, ``true``, ``"3"``, ``[1, 2]``) and a plain string otherwise.

    Example:
        >>> parse_filter(["metadata.seed>=3"]).model_dump()["value"]
        3
    """
    parsed: list[BaseFilter] = []
    for expression in expressions:
        if " in " in expression:
            key, _, raw = expression.partition(" in ")
            value = _parse_value(raw.strip())
            if not isinstance(value, list):
                raise CliError(f"filter {expression!r}: 'in' expects a JSON list, e.g. [1, 2]")
            parsed.append(FilterIN(key=key.strip(), value=value))
            continue
        for symbol, cls in _OPERATORS:
            key, found, raw = expression.partition(symbol)
            if found:
                key = key.strip()
                if not _KEY.match(key):
                    raise CliError(f"filter {expression!r}: bad key {key!r}")
                parsed.append(cls(key=key, value=_parse_value(raw.strip())))
                break
        else:
            raise CliError(
                f"filter {expression!r}: expected KEY OP VALUE with OP one of "
                ">=, <=, !=, ==, =, >, <, in"
            )
    if not parsed:
        return None
    return parsed[0] if len(parsed) == 1 else FilterAND(filters=parsed)


def _open_store(store: Path, create: bool = False) -> Any:
    from tupli_jax.storage.file_storage import FileStorage

    if not create and not (store / "catalog.sqlite").exists():
        raise CliError(f"no store at '{store}' (record something first, or pass --store DIR)")
    return FileStorage(store)


StoreOption = Annotated[Path, typer.Option("--store", help="Store directory.", show_default=True)]


class Kind(str, Enum):
    """What ``list`` lists."""

    benchmarks = "benchmarks"
    episodes = "episodes"
    artifacts = "artifacts"


class Format(str, Enum):
    """Export formats."""

    npz = "npz"
    parquet = "parquet"
    minari = "minari"


@app.command()
def record(
    env_id: Annotated[str, typer.Argument(help="A registered jumanji env id, e.g. Game2048-v1.")],
    num_envs: Annotated[int, typer.Option("--num-envs", min=1)] = 64,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Steps per environment.")] = 1000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    store: StoreOption = Path(DEFAULT_STORE),
    name: Annotated[str | None, typer.Option("--name", help="Benchmark name.")] = None,
    capacity: Annotated[int, typer.Option("--capacity", min=1)] = 256,
    checkpoint_dir: Annotated[Path | None, typer.Option("--checkpoint-dir")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Records ``steps`` steps of ``num-envs`` parallel envs with a random policy into the store."""
    with _one_line_errors():
        import jumanji

        from tupli_jax.pipeline import record as run_record

        if env_id not in jumanji.registered_environments():
            raise CliError(
                f"unknown env id {env_id!r}; registered jumanji envs include "
                + ", ".join(sorted(jumanji.registered_environments())[:6])
                + ", ..."
            )
        result = run_record(
            jumanji.make(env_id),
            storage=_open_store(store, create=True),
            num_envs=num_envs,
            num_steps=steps,
            seed=seed,
            name=name or env_id,
            capacity=capacity,
            checkpoint_dir=checkpoint_dir,
            progress=progress,
        )
        typer.echo(
            f"recorded {result.num_episodes} episodes ({result.num_transitions} transitions) "
            f"into benchmark {result.benchmark_id} in '{store}'"
        )


def _rows(kind: Kind, headers: list[Any]) -> tuple[list[str], list[list[str]]]:
    if kind is Kind.benchmarks:
        cols = ["id", "name", "version", "created_at"]
        return cols, [
            [h.id, h.metadata.name, str(h.metadata.version), h.created_at] for h in headers
        ]
    if kind is Kind.artifacts:
        cols = ["id", "name", "benchmark_id", "created_at"]
        return cols, [[h.id, h.name, str(h.benchmark_id), h.created_at] for h in headers]
    cols = ["id", "benchmark_id", "n_tuples", "return", "end"]  # all fields: --json
    return cols, [
        [
            h.id,
            h.benchmark_id,
            str(h.n_tuples),
            f"{h.episode_return:.3g}",
            "terminated" if h.terminated else "truncated" if h.truncated else "-",
        ]
        for h in headers
    ]


def _table(title: str, columns: list[str], rows: list[list[str]], width: int) -> Any:
    """A rich table that fits ``width`` where it can: the item's own ``id`` whole (it is what
    ``show`` and ``delete`` take), other ids cut with an ellipsis to the room left by the
    other columns (``list benchmarks`` and ``--json`` give them whole)."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    sizes = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    other_ids = [i for i, c in enumerate(columns) if c.endswith("_id")]
    taken = sum(n for i, n in enumerate(sizes) if i not in other_ids) + 2 * len(columns)
    room = max(9, (width - taken) // max(len(other_ids), 1))
    for i, column in enumerate(columns):
        if column == "id":  # UUIDv7 (time first): its end tells ids apart
            table.add_column(column, no_wrap=True, min_width=sizes[i])
        elif i in other_ids:
            table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=room)
        else:
            table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


@app.command("list")
def list_(
    kind: Annotated[Kind, typer.Argument(help="benchmarks, episodes or artifacts.")],
    filter: Annotated[
        list[str] | None,
        typer.Option("--filter", help="KEY OP VALUE, e.g. 'metadata.seed>=3'; repeat to AND."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document per line.")] = False,
    store: StoreOption = Path(DEFAULT_STORE),
) -> None:
    """Lists benchmarks, episodes or artifacts passing the filters.

    The table fits the terminal with each item's id whole; --json prints every field.
    """
    with _one_line_errors():
        storage = _open_store(store)
        query = parse_filter(filter or [])
        lister = {
            Kind.benchmarks: storage.list_benchmarks,
            Kind.episodes: storage.list_episodes,
            Kind.artifacts: storage.list_artifacts,
        }[kind]
        headers = lister(query)
        if as_json:
            for header in headers:
                typer.echo(header.model_dump_json())
            return
        from rich.console import Console

        console = Console()
        columns, rows = _rows(kind, headers)
        title = f"{len(headers)} {kind.value} in '{store}'"
        console.print(_table(title, columns, rows, console.width))


def _find(storage: Any, item_id: str) -> tuple[str, Any]:
    for kind, lister in (
        ("benchmark", storage.list_benchmarks),
        ("episode", storage.list_episodes),
        ("artifact", storage.list_artifacts),
    ):
        found = lister(FilterEQ(key="id", value=item_id))
        if found:
            return kind, found[0]
    raise CliError(f"no benchmark, episode or artifact with id {item_id!r} in '{storage.root}'")


@app.command()
def show(
    item_id: Annotated[str, typer.Argument(help="Any id.")],
    store: StoreOption = Path(DEFAULT_STORE),
) -> None:
    """Prints the header of a benchmark, episode or artifact as JSON (with episode array shapes)."""
    with _one_line_errors():
        storage = _open_store(store)
        kind, header = _find(storage, item_id)
        document: dict[str, Any] = {"kind": kind, **header.model_dump()}
        if kind == "episode":
            from tupli_jax import _tree

            episode = storage.load_episode(item_id)
            shapes = {}
            for group in ("observations", "actions"):
                leaves, spec = _tree.flatten(getattr(episode, group))
                for name, leaf in zip(_tree.leaf_names(spec, group), leaves, strict=True):
                    shapes[name] = f"{leaf.dtype}{list(leaf.shape)}"
            document["arrays"] = shapes
        typer.echo(json.dumps(document, indent=2, default=str))


@app.command()
def export(
    benchmark_id: Annotated[str, typer.Argument()],
    format: Annotated[Format, typer.Option("--format")] = Format.npz,
    out: Annotated[
        Path, typer.Option("--out", help="Output file, or directory for minari.")
    ] = Path("export.npz"),
    store: StoreOption = Path(DEFAULT_STORE),
) -> None:
    """Exports a benchmark's episodes (npz in D4RL layout with timeouts, parquet, or minari)."""
    with _one_line_errors():
        from tupli_jax.export import export_benchmark

        path = export_benchmark(_open_store(store), benchmark_id, format.value, out)
        typer.echo(f"wrote {format.value} export of {benchmark_id} to {path}")


@app.command()
def verify(store: StoreOption = Path(DEFAULT_STORE)) -> None:
    """Checks the store; prints every problem found and exits 1 when there is any."""
    with _one_line_errors():
        problems = _open_store(store).verify()
        for problem in problems:
            typer.echo(problem)
        if problems:
            raise typer.Exit(code=1)
        typer.echo(f"store '{store}' is sound")


@app.command()
def delete(
    item_id: Annotated[str, typer.Argument()],
    keep_episodes: Annotated[
        bool, typer.Option("--keep-episodes", help="Deleting a benchmark keeps its episodes.")
    ] = False,
    store: StoreOption = Path(DEFAULT_STORE),
) -> None:
    """Deletes a benchmark (with its episodes unless --keep-episodes), an episode or an artifact."""
    with _one_line_errors():
        storage = _open_store(store)
        kind, _ = _find(storage, item_id)
        if kind == "benchmark":
            from tupli_jax.benchmark import delete_benchmark

            delete_benchmark(storage, item_id, delete_episodes=not keep_episodes)
        elif kind == "episode":
            storage.delete_episode(item_id)
        else:
            storage.delete_artifact(item_id)
        typer.echo(f"deleted {kind} {item_id}")


def main() -> None:
    """Entry point of the ``tupli-jax`` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
