"""A stand-in for a desktop's notification server (weston has none): owns org.freedesktop.Notifications on
the session bus it is started on and appends every Notify call to a JSON-lines file. System python3 with
python3-dbus and python3-gi (scripts/bootstrap installs them).

    notify_recorder.py RECORD_FILE
"""

import json
import sys

import dbus
import dbus.service
from dbus.mainloop.glib import DBusGMainLoop
from gi.repository import GLib

NAME = "org.freedesktop.Notifications"


class Recorder(dbus.service.Object):
    def __init__(self, bus, path):
        super().__init__(bus, "/org/freedesktop/Notifications")
        self.path = path
        self.next_id = 1

    @dbus.service.method(NAME, in_signature="susssasa{sv}i", out_signature="u")
    def Notify(self, app, replaces, icon, summary, body, actions, hints, timeout):  # noqa: N802
        with open(self.path, "a") as out:
            out.write(json.dumps({"app": str(app), "icon": str(icon), "summary": str(summary),
                                  "body": str(body)}) + "\n")
        self.next_id += 1
        return self.next_id - 1

    @dbus.service.method(NAME, out_signature="ssss")
    def GetServerInformation(self):  # noqa: N802
        return "janus-lab-recorder", "janus-hooks", "1", "1.2"


def main() -> None:
    DBusGMainLoop(set_as_default=True)
    bus = dbus.SessionBus()
    name = dbus.service.BusName(NAME, bus, do_not_queue=True)
    Recorder(bus, sys.argv[1])
    with open(sys.argv[1] + ".ready", "w") as ready:
        ready.write(name.get_name() + "\n")
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
