"""A request's fields (model_lib/requests.py) as a command's options and as a flow's parameters.

Both are signatures made from the same declarations: Typer builds its options from a function's
signature, Prefect its parameter model, the deployment's form and the form's help (the docstring's
`Args:`). Adding a field to a request is the whole change: it shows up on all of them.
"""

from __future__ import annotations

import functools
import inspect
import textwrap
from collections.abc import Callable
from typing import Annotated

from model_lib.requests import CLI, FLOW, Field, fields_of


def flow_parameters(request: tuple[Field, ...]) -> Callable:
    """Decorate `def flow(**request)`: its signature and `Args:` become the request's flow fields, taken by
    position or name as a hand-written signature would take them."""

    def decorate(function: Callable) -> Callable:
        fields = fields_of(request, FLOW)
        signature = inspect.Signature(
            [_parameter(f.name, f.flow_type, f.default, inspect.Parameter.POSITIONAL_OR_KEYWORD) for f in fields],
            return_annotation=inspect.signature(function).return_annotation,
        )

        @functools.wraps(function)
        def flow(*args, **kwargs):
            return function(**signature.bind(*args, **kwargs).arguments)  # an unknown name: TypeError

        _set_signature(flow, signature)
        args = "\n".join(_described(field) for field in fields)
        flow.__doc__ = f"{inspect.cleandoc(function.__doc__ or '')}\n\nArgs:\n{args}\n"
        return flow

    return decorate


def _described(field: Field) -> str:
    """`name: help` as a Google-style `Args:` entry, where Prefect finds the form's help."""
    first, *rest = textwrap.wrap(f"{field.name}: {field.help}", 96)
    return "\n".join(["    " + first, *("        " + line for line in rest)])


def command_options(request: tuple[Field, ...]) -> Callable:
    """Decorate `def command(**request)`: its signature becomes the request's command-line fields."""
    import typer

    def decorate(function: Callable) -> Callable:
        parameters = []
        for field in fields_of(request, CLI):
            kind = typer.Argument if field.argument else typer.Option
            declared = kind(help=field.cli_help) if field.argument else kind(*field.option_names, help=field.cli_help)
            base = field.cli_type or (str if field.choices else field.type)
            annotation = Annotated[base if field.argument or field.default is not None else base | None, declared]
            default = inspect.Parameter.empty if field.argument else field.default
            parameters.append(_parameter(field.name, annotation, default, inspect.Parameter.KEYWORD_ONLY))
        _set_signature(function, inspect.Signature(parameters, return_annotation=None))
        return function

    return decorate


def _parameter(name: str, annotation: object, default: object, kind: inspect._ParameterKind) -> inspect.Parameter:
    return inspect.Parameter(name, kind, default=default, annotation=annotation)


def _set_signature(function: Callable, signature: inspect.Signature) -> None:
    function.__signature__ = signature
    function.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    function.__annotations__["return"] = signature.return_annotation
