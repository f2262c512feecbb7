"""The one exception type for mistakes a user can fix: printed as one line, no traceback."""


class UserError(Exception):
    """A problem with the user's input (config, data, paths). The CLI prints it and exits non-zero.

    `exit_code` follows the CLI convention: 2 for usage/config errors, 1 for failures at run time.
    """

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
