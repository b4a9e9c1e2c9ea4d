"""One error type for bad input, so every stage can fail with a clear message and a non-zero exit."""


class PipelineError(Exception):
    """Bad input or an impossible request.

    The message says what is wrong, where (file, line, param) and how to fix it; stage
    entry points print it without a traceback and exit with status 2.
    """

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [what]
        if where:
            parts.append(f"where: {where}")
        if fix:
            parts.append(f"fix: {fix}")
        super().__init__("\n  ".join(parts))
