#include "core/fs.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace mxn {

namespace {
std::string sys_err() { return std::strerror(errno); }
}  // namespace

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

uint64_t checksum_of(const std::vector<std::string_view>& parts) {
  XXH3_state_t* st = XXH3_createState();
  MXN_CHECK(st != nullptr && XXH3_64bits_reset(st) == XXH_OK, "XXH3: cannot make a state");
  for (std::string_view p : parts) XXH3_64bits_update(st, p.data(), p.size());
  const uint64_t sum = XXH3_64bits_digest(st);
  XXH3_freeState(st);
  return sum;
}

void write_file_atomic(const std::string& path, std::string_view data) {
  write_file_atomic(path, std::vector<std::string_view>{data});
}

void write_file_atomic(const std::string& path, const std::vector<std::string_view>& parts) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0 && errno == ENOENT) {
    const std::string dir = std::filesystem::path(path).parent_path().string();
    throw Error("cannot write " + path + ": the folder '" + (dir.empty() ? "." : dir) +
                "' does not exist");
  }
  if (fd < 0) throw Error("cannot write " + tmp + ": " + sys_err());
  for (std::string_view data : parts) {
    size_t done = 0;
    while (done < data.size()) {
      ssize_t n = ::write(fd, data.data() + done, data.size() - done);
      if (n < 0) {
        if (errno == EINTR) continue;
        const std::string e = sys_err();
        ::close(fd);
        ::unlink(tmp.c_str());
        throw Error("cannot write " + tmp + ": " + e);
      }
      done += size_t(n);
    }
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    throw Error("cannot flush " + tmp + ": " + sys_err());
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    throw Error("cannot rename " + tmp + " to " + path + ": " + sys_err());
  }
  fsync_dir(std::filesystem::path(path).parent_path().string());
}

std::string read_file(const std::string& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(what + " '" + path + "' cannot be opened: " + sys_err());
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

MappedFile::MappedFile(const std::string& path, const std::string& what) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw Error(what + " '" + path + "' cannot be opened: " + sys_err());
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(what + " '" + path + "' is not a regular file");
  }
  size_ = size_t(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      throw Error(what + " '" + path + "' cannot be mapped: " + sys_err());
    }
    data_ = static_cast<const char*>(p);
  }
  ::close(fd);
}

void MappedFile::release(size_t begin, size_t n) const {
  if (!data_ || n == 0) return;
  const size_t page = size_t(::sysconf(_SC_PAGESIZE));
  const size_t lo = begin / page * page, hi = std::min(size_, (begin + n + page - 1) / page * page);
  if (hi > lo) ::madvise(const_cast<char*>(data_) + lo, hi - lo, MADV_DONTNEED);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<char*>(data_), size_);
}

}  // namespace mxn
