"""Saving a result is atomic and leaves ordinary permissions; a save killed between the
two renames that replace a result loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from napari_slide_attention.results import SlideResult
from test_results import make_result


def _modes(root):
    return {p.relative_to(root).as_posix(): p.stat().st_mode & 0o777 for p in root.rglob("*")}


def test_a_saved_result_has_the_modes_of_an_ordinary_folder_and_files(tmp_path):
    saved = make_result().save(tmp_path / "result")
    folder, plain = tmp_path / "plain-folder", tmp_path / "plain-file"
    folder.mkdir()
    plain.write_bytes(b"")
    assert saved.stat().st_mode & 0o777 == folder.stat().st_mode & 0o777
    modes = _modes(saved)
    assert {m for name, m in modes.items() if (saved / name).is_dir()} == {
        folder.stat().st_mode & 0o777
    }
    assert {m for name, m in modes.items() if (saved / name).is_file()} == {
        plain.stat().st_mode & 0o777
    }


def _killed_between_renames(target) -> None:
    """A save over ``target`` in a child process, SIGKILLed right after its first rename
    moved the old result aside."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_results import make_result
        from napari_slide_attention import results

        real = os.replace
        def replace(src, dst):
            real(src, dst)
            if ".old-" in os.fspath(dst):
                os.kill(os.getpid(), signal.SIGKILL)
        results.os.replace = replace
        make_result(seed=1).save({str(target)!r})
        """
    )
    code = subprocess.run([sys.executable, "-c", script], timeout=300).returncode
    assert code == -signal.SIGKILL


def test_a_save_killed_between_its_renames_keeps_the_old_result(tmp_path):
    target = tmp_path / "result"
    old = make_result(seed=0)
    old.save(target)
    _killed_between_renames(target)
    assert not target.exists()  # the kill landed where the old result was aside
    aside = [p.name for p in tmp_path.iterdir() if p.name.startswith(".result.old-")]
    assert len(aside) == 1

    loaded = SlideResult.load(target)  # put back where it was
    assert loaded.pieces[0].probabilities.tolist() == old.pieces[0].probabilities.tolist()
    assert target.is_dir() and not [p for p in tmp_path.iterdir() if ".old-" in p.name]

    _killed_between_renames(target)
    new = make_result(seed=2)
    new.save(target)  # a save after such a kill also puts things right first
    saved = SlideResult.load(target).pieces[0].probabilities.tolist()
    assert saved == new.pieces[0].probabilities.tolist() != old.pieces[0].probabilities.tolist()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".result.tmp-")) == [
        "result"
    ]
