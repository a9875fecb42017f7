from umbra.errors import EXIT_INTERNAL, EXIT_USAGE, EXIT_WARNING, UmbraError, all_error_classes


def test_exit_codes_unique_and_documented() -> None:
    codes: dict[int, str] = {}
    for cls in all_error_classes():
        assert cls.__doc__ and cls.__doc__.strip(), f"{cls.__name__} has no message template"
        assert cls.exit_code not in codes, (
            f"{cls.__name__} reuses exit code {cls.exit_code} of {codes.get(cls.exit_code)}"
        )
        assert cls.exit_code not in (0, EXIT_WARNING, EXIT_USAGE, EXIT_INTERNAL)
        codes[cls.exit_code] = cls.__name__
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "ERRORS.md").read_text()
    for code, name in codes.items():
        assert f"| {code} | `{name}`" in doc, f"docs/ERRORS.md does not list {name} ({code})"


def test_message_from_template() -> None:
    from umbra.errors import TargetTooSmall

    err = TargetTooSmall(path="/dev/x", size=1, needed=2)
    assert str(err).startswith("target /dev/x has 1 bytes but the point needs 2")
    assert UmbraError("plain").message == "plain"
