"""`--help` in sections (Data, Model, Loss, ...): click has no option groups, so each option carries a
`group` (from its config field's metadata) and the command renders one section per group."""

import click

# Sections in this order; groups not listed follow in the order their first option appears.
GROUP_ORDER = ("Data", "Model", "Tokenization", "Loss", "Optimisation", "Output")
OTHER = "Other"


class GroupedOption(click.Option):
    def __init__(self, *args, group: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group


class GroupedCommand(click.Command):
    """A command whose --help lists options under '<group> options' headings."""

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, "group", None) or OTHER, []).append(record)
        order = {name: i for i, name in enumerate(GROUP_ORDER)}
        appearance = list(sections)
        for name in sorted(sections, key=lambda g: (g == OTHER, order.get(g, len(order)), appearance.index(g))):
            with formatter.section(f"{name} options"):
                formatter.write_dl(sections[name])
