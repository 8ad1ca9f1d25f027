import jaxspeech


def test_version():
    assert jaxspeech.__version__.count(".") == 2


def test_pyfile_loads_a_file_and_its_siblings(tmp_path):
    import pytest

    from jaxspeech import pyfile

    (tmp_path / "base.py").write_text("def get_config(arg=None):\n    return {'arg': arg}\n")
    (tmp_path / "child.py").write_text(
        "from jaxspeech import pyfile\nBASE = pyfile.sibling(__file__, 'base')\n"
    )
    child = pyfile.load(str(tmp_path / "child.py"))
    assert child.__name__ == "child" and child.BASE.get_config("x") == {"arg": "x"}
    with pytest.raises(FileNotFoundError, match="nope.py"):
        pyfile.load(str(tmp_path / "nope.py"))
