#include "serve/http_guard.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace mxn {

namespace {

using Clock = std::chrono::steady_clock;

thread_local int t_sock = -1;
thread_local bool t_close = false;

int ms_until(Clock::time_point t) {
  const auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(t - Clock::now()).count();
  return int(std::clamp<int64_t>(ms, 0, 1 << 30));
}

// The client has closed (or reset) the connection; bytes it sent that are not read yet (a
// pipelined request) do not count.
bool peer_closed(int fd) {
  pollfd p{fd, POLLIN | POLLRDHUP, 0};
  if (poll(&p, 1, 0) <= 0) return false;
  if (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) return true;
  char ch;
  const ssize_t n = recv(fd, &ch, 1, MSG_PEEK | MSG_DONTWAIT);
  return n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR);
}

// A short answer written straight to a connection that gets no further (the socket is new or
// its send buffer nearly empty: one non-blocking send).
void refuse(int fd, int status, const char* reason, const char* message) {
  const std::string body = std::string(R"({"error":{"message":")") + message +
                           R"(","type":"invalid_request_error","param":null,"code":null}})";
  const std::string s =
      "HTTP/1.1 " + std::to_string(status) + " " + reason +
      "\r\nContent-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) +
      "\r\nConnection: close\r\n\r\n" + body;
  (void)!send(fd, s.data(), s.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
}

// httplib's task queue runs each accepted socket's task on the accepting thread: the task only
// hands the socket to the gate (process_and_close_socket below), which never blocks.
class Inline final : public httplib::TaskQueue {
  void enqueue(std::function<void()> fn) override { fn(); }
  void shutdown() override {}
};

}  // namespace

struct GuardedServer::Conn {
  int fd = -1;
  std::string addr;
  int port = 0;
  std::string buf;  // bytes read, not yet given to httplib (from `off`)
  size_t off = 0;
  size_t scanned = 0;  // bytes of buf already searched for the headers' end
  Clock::time_point deadline;
  int served = 0;  // requests answered on it
};

namespace {

// The stream httplib reads one request from and writes its answer to: the gathered bytes first,
// then the socket, every read before the request's deadline.
class ConnStream final : public httplib::Stream {
 public:
  ConnStream(GuardedServer::Conn& c, Clock::time_point deadline, int write_timeout_ms)
      : c_(c), deadline_(deadline), write_ms_(write_timeout_ms) {}
  bool is_readable() const override { return c_.off < c_.buf.size() || wait(POLLIN, 0); }
  // Writable, and not closed by the client (as httplib's own stream: a stream's next chunk is
  // not made for a client that has gone).
  bool is_writable() const override { return wait(POLLOUT, write_ms_) && !peer_closed(c_.fd); }
  ssize_t read(char* ptr, size_t size) override {
    if (c_.off < c_.buf.size()) {
      const size_t n = std::min(size, c_.buf.size() - c_.off);
      std::copy_n(c_.buf.data() + c_.off, n, ptr);
      c_.off += n;
      if (c_.off == c_.buf.size()) c_.buf.clear(), c_.off = 0;
      return ssize_t(n);
    }
    if (!wait(POLLIN, ms_until(deadline_))) return -1;  // the request's time is up
    return recv(c_.fd, ptr, size, MSG_DONTWAIT);
  }
  ssize_t write(const char* ptr, size_t size) override {
    if (!wait(POLLOUT, write_ms_)) return -1;
    return send(c_.fd, ptr, size, MSG_NOSIGNAL | MSG_DONTWAIT);
  }
  void get_remote_ip_and_port(std::string& ip, int& port) const override {
    ip = c_.addr;
    port = c_.port;
  }
  void get_local_ip_and_port(std::string& ip, int& port) const override {
    sockaddr_storage a{};
    socklen_t n = sizeof(a);
    ip.clear();
    port = 0;
    if (getsockname(c_.fd, reinterpret_cast<sockaddr*>(&a), &n) == 0) name(a, ip, port);
  }
  socket_t socket() const override { return c_.fd; }

  static void name(const sockaddr_storage& a, std::string& ip, int& port) {
    char text[INET6_ADDRSTRLEN] = {};
    if (a.ss_family == AF_INET) {
      const auto& v4 = reinterpret_cast<const sockaddr_in&>(a);
      inet_ntop(AF_INET, &v4.sin_addr, text, sizeof(text));
      port = ntohs(v4.sin_port);
    } else if (a.ss_family == AF_INET6) {
      const auto& v6 = reinterpret_cast<const sockaddr_in6&>(a);
      inet_ntop(AF_INET6, &v6.sin6_addr, text, sizeof(text));
      port = ntohs(v6.sin6_port);
    }
    ip = text;
  }

 private:
  bool wait(short events, int ms) const {
    pollfd p{c_.fd, events, 0};
    while (true) {
      const int r = poll(&p, 1, ms);
      if (r < 0 && errno == EINTR) continue;
      return r > 0 && (p.revents & (events | POLLHUP | POLLERR));
    }
  }
  GuardedServer::Conn& c_;
  Clock::time_point deadline_;
  int write_ms_;
};

}  // namespace

// Gathers each connection's request line and headers on one poll thread, then hands the
// connection to a worker; counts connections per address.
class GuardedServer::Gate {
 public:
  Gate(GuardedServer& s, const HttpLimits& l)
      : s_(s), l_(l), wake_(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)), workers_(l.threads) {
    thread_ = std::thread([this] { run(); });
  }
  ~Gate() { stop(); }
  void stop() {
    if (stopped_.exchange(true)) return;
    wake();
    thread_.join();
    workers_.shutdown();  // the answers under way finish
    std::lock_guard<std::mutex> l(m_);
    for (auto& c : incoming_) ::close(c->fd);
    incoming_.clear();
    if (wake_ >= 0) ::close(wake_);
  }

  // A new connection: refused at once over the limits, else gathered.
  void accept(int fd) {
    auto c = std::make_unique<Conn>();
    c->fd = fd;
    sockaddr_storage a{};
    socklen_t n = sizeof(a);
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&a), &n) == 0)
      ConnStream::name(a, c->addr, c->port);
    {
      std::lock_guard<std::mutex> l(m_);
      const char* why = nullptr;
      int status = 0;
      if (stopped_) {
        why = "the server is stopping", status = 503;
      } else if (open_ >= l_.connections) {
        why = "the server has too many connections open", status = 503;
      } else if (per_addr_[c->addr] >= l_.per_client) {
        why = "too many connections from this address", status = 429;
      }
      if (why) {
        refuse(fd, status, status == 429 ? "Too Many Requests" : "Service Unavailable", why);
        ::shutdown(fd, SHUT_RDWR);
        ::close(fd);
        return;
      }
      ++open_;
      ++per_addr_[c->addr];
    }
    c->deadline = Clock::now() + std::chrono::seconds(l_.header_timeout_s);
    give(std::move(c));
  }
  void give(std::unique_ptr<Conn> c) {
    {
      std::lock_guard<std::mutex> l(m_);
      incoming_.push_back(std::move(c));
    }
    wake();
  }
  // `linger`: the client may still be sending a body nobody read; the answer goes first, then
  // what it sends is read and dropped for a while (as nginx's lingering close), so that closing
  // on unread bytes does not reset the connection before the client has read its answer.
  void close(std::unique_ptr<Conn> c, bool linger = false) {
    if (linger) {
      ::shutdown(c->fd, SHUT_WR);
      const Clock::time_point end = Clock::now() + std::chrono::seconds(2);
      char sink[16384];
      for (size_t got = 0; got < (size_t(16) << 20);) {
        pollfd p{c->fd, POLLIN, 0};
        if (poll(&p, 1, ms_until(end)) <= 0) break;
        const ssize_t n = recv(c->fd, sink, sizeof(sink), MSG_DONTWAIT);
        if (n <= 0 && !(n < 0 && (errno == EAGAIN || errno == EINTR))) break;
        got += size_t(std::max<ssize_t>(n, 0));
      }
    }
    ::shutdown(c->fd, SHUT_RDWR);
    ::close(c->fd);
    std::lock_guard<std::mutex> l(m_);
    --open_;
    if (--per_addr_[c->addr] == 0) per_addr_.erase(c->addr);
  }
  bool stopping() const { return stopped_; }

 private:
  void wake() {
    const uint64_t one = 1;
    (void)!::write(wake_, &one, sizeof(one));
  }
  // Whole headers in c's buffer: the worker takes it. Too many bytes or lines: 431.
  enum class Headers { partial, whole, too_large };
  Headers check(Conn& c) {
    const size_t from = std::max(c.off, c.scanned >= 3 ? c.scanned - 3 : size_t(0));
    const size_t end = c.buf.find("\r\n\r\n", from);
    c.scanned = c.buf.size();
    const size_t stop = end == std::string::npos ? c.buf.size() : end;
    if (stop - c.off > l_.header_bytes) return Headers::too_large;
    if (end == std::string::npos) return Headers::partial;
    if (std::count(c.buf.begin() + long(c.off), c.buf.begin() + long(end), '\n') >= l_.header_lines)
      return Headers::too_large;
    return Headers::whole;
  }
  void dispatch(std::unique_ptr<Conn> c) {
    c->scanned = 0;
    Conn* raw = c.release();
    workers_.enqueue([this, raw] { s_.serve(std::unique_ptr<Conn>(raw)); });
  }
  void run() {
    std::vector<std::unique_ptr<Conn>> conns;
    std::vector<pollfd> fds;
    char tmp[4096];
    while (!stopped_) {
      {
        std::lock_guard<std::mutex> l(m_);
        for (auto& c : incoming_) conns.push_back(std::move(c));
        incoming_.clear();
      }
      // Leftover bytes may already hold a kept-alive connection's next request.
      for (auto& c : conns)
        if (c && c->off < c->buf.size() && check(*c) == Headers::whole) dispatch(std::move(c));
      std::erase(conns, nullptr);
      fds.assign(1, pollfd{wake_, POLLIN, 0});
      Clock::time_point soonest = Clock::now() + std::chrono::seconds(1);
      for (auto& c : conns) {
        fds.push_back({c->fd, POLLIN, 0});
        soonest = std::min(soonest, c->deadline);
      }
      const int r = poll(fds.data(), fds.size(), ms_until(soonest));
      if (r < 0 && errno != EINTR) break;
      if (fds[0].revents & POLLIN) {
        uint64_t n;
        (void)!::read(wake_, &n, sizeof(n));
      }
      const Clock::time_point now = Clock::now();
      for (size_t i = 0; i < conns.size(); ++i) {
        auto& c = conns[i];
        if (fds[i + 1].revents) {
          const ssize_t n = recv(c->fd, tmp, sizeof(tmp), MSG_DONTWAIT);
          if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            close(std::move(c));
            continue;
          }
          if (n > 0) c->buf.append(tmp, size_t(n));
          const Headers h = check(*c);
          if (h == Headers::whole) {
            dispatch(std::move(c));
            continue;
          }
          if (h == Headers::too_large) {
            refuse(c->fd, 431, "Request Header Fields Too Large",
                   "the request line and headers are too large");
            close(std::move(c));
            continue;
          }
        }
        if (now >= c->deadline) {
          if (c->off < c->buf.size())  // a request begun and not finished in time
            refuse(c->fd, 408, "Request Timeout", "the request headers took too long");
          close(std::move(c));
        }
      }
      std::erase(conns, nullptr);
    }
    for (auto& c : conns) close(std::move(c));
  }

  GuardedServer& s_;
  HttpLimits l_;
  int wake_;
  httplib::ThreadPool workers_;
  std::thread thread_;
  std::atomic<bool> stopped_{false};
  std::mutex m_;
  std::vector<std::unique_ptr<Conn>> incoming_;
  int open_ = 0;
  std::map<std::string, int> per_addr_;
};

GuardedServer::GuardedServer(const HttpLimits& limits)
    : limits_(limits), gate_(std::make_unique<Gate>(*this, limits)) {
  new_task_queue = [] { return new Inline; };
}

GuardedServer::~GuardedServer() { shut_down(); }

void GuardedServer::shut_down() { gate_->stop(); }

bool GuardedServer::process_and_close_socket(socket_t sock) {
  gate_->accept(sock);
  return true;
}

void GuardedServer::serve(std::unique_ptr<Conn> c) {
  t_sock = c->fd;
  t_close = false;
  ConnStream s(*c, Clock::now() + std::chrono::seconds(limits_.body_timeout_s),
               int(write_timeout_sec_ * 1000 + write_timeout_usec_ / 1000));
  const bool last = ++c->served >= int(keep_alive_max_count_) || gate_->stopping();
  bool closed = false;
  const bool ok = process_request(s, last, closed, nullptr);
  const bool again = ok && !closed && !last && !t_close && !gate_->stopping();
  const bool unread = t_close;
  t_sock = -1;
  if (!again) return gate_->close(std::move(c), unread);
  c->deadline = Clock::now() + std::chrono::seconds(limits_.keep_alive_s);
  gate_->give(std::move(c));
}

bool GuardedServer::peer_gone() { return t_sock >= 0 && peer_closed(t_sock); }

void GuardedServer::close_after() { t_close = true; }

}  // namespace mxn
