import jaxspeech


def test_version():
    assert jaxspeech.__version__.count(".") == 2
