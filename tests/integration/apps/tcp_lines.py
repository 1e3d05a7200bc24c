"""A TCP server that serves one connection after another: each line received is answered with
"<host pid> <n> <line>", n counting that connection's lines. A connection that breaks (one a
restore brought back closed) is dropped and the next one accepted."""

import os
import socket
import sys

srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(16)
print("listening", flush=True)
while True:
    conn, _ = srv.accept()
    n = 0
    buf = b""
    try:
        while True:
            data = conn.recv(4096)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                n += 1
                # The host pid (the host's procfs), which torpor reports: which copy answered.
                me = os.readlink("/proc/self").encode()
                conn.sendall(b"%s %d %s\n" % (me, n, line))
    except OSError:
        pass  # reset or not connected: on to the next
    finally:
        conn.close()
