"""`watch` (flows/watch.py): once it says it is watching, every new file counts."""

import threading
import time

import flows.watch as watch_module
from flows.watch import INBOX_EVENT, watch_folders


def test_a_file_written_the_moment_watching_is_said_becomes_an_event(tmp_path, monkeypatch):
    # "Watching" used to be said before the watcher was set up: on a loaded CI host the service guide's burst,
    # copied as soon as it appeared, never became an event. The events are caught where they would be sent: the
    # server's side of them is tests/flows/test_deployments.py's.
    sent = []

    async def send(events):
        sent.extend(events)

    monkeypatch.setattr(watch_module, "send_events", send)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    watching, stop = threading.Event(), threading.Event()
    watcher = threading.Thread(target=watch_folders, args=({"inbox": inbox}, 0.5),
                               kwargs={"log": lambda line: None, "stop": stop, "ready": watching.set})  # fmt: skip
    watcher.start()
    try:
        assert watching.wait(60)
        (inbox / "photo.png").write_bytes(b"\x89PNG")  # at once: no grace period a person would not give it
        deadline = time.monotonic() + 30
        while not sent and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        watcher.join(30)
    assert [(event.event, event.payload["files"]) for event in sent] == [(INBOX_EVENT, ["photo.png"])]
