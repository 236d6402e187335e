"""The project's two errors: bad input (exit status 2) and a run that went wrong (exit status 1). Each is printed
as one line by cli.run, never as a traceback."""


class UserError(Exception):
    """Bad input from the user (a path, a file, a value): printed as one line, exit status 2."""
    status = 2

    def __init__(self, message):
        super().__init__(message)
        self.message = str(message)

    def __str__(self):  # the line as raised, even after fastai prefixes the args of an error inside a callback
        return self.message


class RunFailed(UserError):
    """The run itself went wrong (training diverged): printed as one line, exit status 1."""
    status = 1

