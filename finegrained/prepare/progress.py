"""Progress of long data work (downloads, extraction, checking and resizing images).

On a terminal, a fastprogress bar; otherwise (a log file, CI) one line on stderr each time another
tenth of the work is done, so a log holds at most about a dozen lines per task, plus one at the end.
Bytes are shown in MB with the rate and the time left; other work as "N of TOTAL"."""
import sys
import time

MB = 1_000_000


def _terminal():
    return sys.stdout.isatty()  # where fastprogress draws


def _duration(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


class Progress:
    """`update(done)` with the amount done so far (bytes when `unit="bytes"`, else items), then `close()`.

    `total` may be None (a download without Content-Length): then a line every `every_s` seconds."""

    def __init__(self, total, label, unit="items", every_s=30.0, bar=None):
        self.total, self.label, self.unit, self.every_s = total, label, unit, every_s
        self.start = self.last_line = time.monotonic()
        self.done, self.next_tenth, self.closed, self.printed = 0, 1, False, None
        self.bar = None
        if (_terminal() if bar is None else bar) and total:
            from fastprogress.fastprogress import progress_bar
            steps = self._steps(total)
            self.bar = progress_bar(range(steps), total=steps, leave=True)
            self.bar.prefix = label
            self.bar.update(0)

    def _steps(self, amount):
        return -(-amount // MB) if self.unit == "bytes" else amount  # MB, rounded up, for bytes

    def _amount(self, amount):
        return f"{amount / MB:,.1f} MB" if self.unit == "bytes" else f"{amount:,}"

    def _details(self, elapsed):
        """', 12.3 MB/s, 1 min 30 s left' as far as known."""
        text = f", {self.done / MB / elapsed:,.1f} MB/s" if self.unit == "bytes" and elapsed > 0 else ""
        if self.total and 0 < self.done < self.total:
            text += f", {_duration(elapsed * (self.total - self.done) / self.done)} left"
        return text

    def line(self):
        """The state as one line, as printed in a log."""
        if self.total:
            text = f"{self.label}: {100 * self.done // self.total:3d}%, {self._amount(self.done)} of {self._amount(self.total)}"
        else:
            text = f"{self.label}: {self._amount(self.done)} (total unknown)"
        return text + self._details(time.monotonic() - self.start)

    def update(self, done):
        self.done = done
        if self.bar is not None:
            elapsed = time.monotonic() - self.start
            self.bar.comment = self._details(elapsed).lstrip(", ")
            self.bar.update(min(self._steps(done), self.bar.total))
        elif self.total:
            tenth = 10 * done // self.total
            if tenth >= self.next_tenth:
                self.next_tenth = tenth + 1
                self._print()
        elif time.monotonic() - self.last_line >= self.every_s:
            self._print()

    def _print(self):
        self.last_line, self.printed = time.monotonic(), self.done
        print(self.line(), file=sys.stderr, flush=True)

    def close(self):
        """End the bar, or print the last state if no line showed it yet (work that stopped early, or had no total)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            print(file=sys.stdout, flush=True)  # the bar leaves the cursor at its end
        elif self.printed != self.done:
            self._print()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def track(items, total, label):
    """Yield from `items` (`total` of them), showing how many of how many are done."""
    with Progress(total, label) as progress:
        for done, item in enumerate(items, 1):
            yield item
            progress.update(done)
