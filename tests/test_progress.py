"""Start-up progress is silent for quick work and shown for slow work."""

from __future__ import annotations

from dendrite_jax.progress import Progress


def test_quiet_when_fast(capsys):
    progress = Progress("loading", 10, after_seconds=60)
    for i in range(10):
        progress.update(i + 1)
    progress.close()
    assert capsys.readouterr().err == ""


def test_shown_when_slow(capsys):
    progress = Progress("loading", 4, after_seconds=0)
    progress.update(2)
    progress.close()
    err = capsys.readouterr().err
    assert "loading:  50% (2/4)" in err and "done in" in err
