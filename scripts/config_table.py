"""Print the README's configuration table (reStructuredText) from mpr_server.config.SETTINGS."""

from mpr_server.config import SETTINGS


def table() -> str:
    lines = [".. list-table::", "   :header-rows: 1", "   :widths: 22 12 54", ""]
    lines += ["   * - Variable (option)", "     - Default", "     - Meaning"]
    for s in SETTINGS:
        default = "(none)" if s.default is None else (f"``{s.default}``" if s.default else "(empty)")
        lines += [f"   * - ``{s.env}`` (``--{s.option}``)", f"     - {default}", f"     - {s.doc}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
