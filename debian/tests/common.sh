# Shared by the tests: a loopback backend and a client, in python3.

# backend TAG: start a backend that greets every client with TAG; sets
# BACKEND_PORT and BACKEND_PID.
backend() {
	python3 -c '
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[1].encode() + b"\n")
    c.close()
' "$1" > "$AUTOPKGTEST_TMP/backend.$1" &
	BACKEND_PID=$!
	for _ in $(seq 100); do
		# (the background job may not have created the file yet: not an error)
		BACKEND_PORT=$(cat "$AUTOPKGTEST_TMP/backend.$1" 2>/dev/null || true)
		[ -n "$BACKEND_PORT" ] && return 0
		sleep 0.1
	done
	echo "backend $1 did not start" >&2
	return 1
}

# free_port: a TCP port nothing listens on now.
free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# greeting PORT: the first line a client reads through 127.0.0.1:PORT,
# retried for up to 10 s while nothing listens yet.
greeting() {
	python3 -c '
import socket, sys, time
deadline = time.monotonic() + 10
while True:
    try:
        with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5) as c:
            print(c.makefile().readline().strip())
            break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
' "$1"
}

# expect WHAT GOT WANT
expect() {
	if [ "$2" != "$3" ]; then
		printf '%s: got "%s", want "%s"\n' "$1" "$2" "$3" >&2
		exit 1
	fi
	echo "ok: $1"
}

# running PID: true while PID runs.  A master that has exited but is not yet
# reaped by whoever adopted it (a zombie) has stopped: the init script says
# "stopped" then, and kill -0 would still find it.
running() {
	state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
	[ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}
