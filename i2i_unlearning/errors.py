"""Errors that name the bad input and say what to do; raised before any expensive work."""


class ConfigError(ValueError):
    """A configuration that cannot work (unknown class, overlapping splits, bad sizes)."""


class DataError(RuntimeError):
    """Missing or corrupt data on disk (data set not installed, shard missing or corrupt)."""


class UnsafeFileError(DataError):
    """A file this project wrote (a checkpoint, a cached model) that holds more than tensors and plain data:
    loading it could run code, so it is refused and the message says what to do (delete or re-create it)."""


class NonFiniteError(RuntimeError):
    """A training loss that became NaN or infinite: names the stage and the step (the cell fails, the sweep goes on)."""


class Interrupted(BaseException):  # noqa: N818 -- like KeyboardInterrupt: no `except Exception` swallows it
    """A signal (SIGTERM, SIGINT, SIGUSR1) stopped a run; the stage saved a checkpoint when it was training.

    ``signum`` the signal, ``stage`` / ``step`` where it stopped (None outside a training stage)."""

    def __init__(self, signum: int, stage: str | None = None, step: int | None = None):
        import signal

        self.signum, self.stage, self.step = signum, stage, step
        where = f" in {stage} at step {step}" if stage is not None else ""
        super().__init__(f"{signal.Signals(signum).name}{where}")

    @property
    def exit_code(self) -> int:
        """The shell's code of a process ended by this signal (128 + its number)."""
        return 128 + self.signum
