"""serving.Server.start(progress=True): the phase its bar shows is the server log's latest line. No server is
started here (the start itself is covered by tests/test_serving.py)."""

from labutils import serving


def test_log_phase_is_the_last_line_and_names_a_warning_without_repeating_it(tmp_path):
    srv = serving.Server(tmp_path)
    srv.log_path = tmp_path / "serve.log"
    assert srv._log_phase() == ""  # no log yet
    srv.log_path.write_text("")
    assert srv._log_phase() == "python starting (imports)"
    srv.log_path.write_text("INFO:     Started server process [12]\nINFO:     Waiting for application startup.\n\n")
    assert srv._log_phase() == "INFO:     Waiting for application startup."
    srv.log_path.write_text("x" * 5000 + "\n/a/b.py:3: UserWarning: something\n")
    assert srv._log_phase() == "the log has a warning (see the log)"
