"""User-facing errors: the CLI prints them as one line and exits with status 2, no traceback."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, environment)."""

    exit_code = 2


class ConfigError(UserError):
    """Every problem found in a config, each as (field, value, fix)."""

    def __init__(self, problems: list[tuple[str, object, str]]):
        self.problems = list(problems)
        text = "; ".join(f"{field}={value!r}: {fix}" for field, value, fix in self.problems)
        if len(self.problems) > 1:
            text = f"{len(self.problems)} config problems: {text}"
        super().__init__(text)
