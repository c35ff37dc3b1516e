#pragma once
// cpp-httplib's server with the limits a hostile client must not get round. httplib 0.11 bounds
// only the idle time between two bytes and a body's Content-Length, so 140 connections sending a
// header line every 2 s held all its threads and /health stopped answering. Here:
// - a connection takes a worker thread only once its request line and headers have arrived whole:
//   one poll thread gathers them, at most `header_bytes` in `header_lines` lines within
//   `header_timeout_s` in all (408 / 431 otherwise), so slow headers starve no endpoint;
// - at most `per_client` connections are open from one address and `connections` in all (429 /
//   503 at once, before any reading);
// - a request's body must arrive within `body_timeout_s`; handlers bound its decoded size
//   themselves (a content reader: chunked, gzip and deflate bodies too);
// - a handler can ask whether its client has hung up (peer_gone()), and end the connection after
//   its answer (close_after(): a body it did not read whole).
#include <httplib.h>

#include <memory>

namespace mxn {

struct HttpLimits {
  int header_timeout_s = 10;
  int body_timeout_s = 60;
  int keep_alive_s = 5;  // an idle kept-alive connection's wait for its next request's headers
  size_t header_bytes = 16384;
  int header_lines = 100;
  int per_client = 256;
  int connections = 4096;
  size_t threads = 128;  // workers: requests being answered at once
};

class GuardedServer : public httplib::Server {
 public:
  explicit GuardedServer(const HttpLimits& limits);
  ~GuardedServer() override;
  // Ends the gathering thread and the workers once stop() has ended listen_after_bind(); the
  // answers under way are finished first.
  void shut_down();

  // For the handler running on this thread: its client has closed the connection.
  static bool peer_gone();
  // For the handler running on this thread: close the connection after this answer.
  static void close_after();

  struct Conn;

 private:
  bool process_and_close_socket(socket_t sock) override;
  void serve(std::unique_ptr<Conn> c);  // one request, on a worker
  class Gate;
  HttpLimits limits_;
  std::unique_ptr<Gate> gate_;
};

}  // namespace mxn
