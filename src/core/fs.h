#pragma once
// Files a user would miss are written atomically: a temp file beside the target, fsync, rename,
// fsync of the folder. A crash at any point leaves either the old file or the new one.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace mxn {

void write_file_atomic(const std::string& path, std::string_view data);
// The same with the file's bytes in pieces, written one after another.
void write_file_atomic(const std::string& path, const std::vector<std::string_view>& parts);
void fsync_dir(const std::string& dir);
// The XXH3-64 checksum (libxxhash) of the bytes, piece after piece, as of one file of them:
// about 10x zlib's CRC-32 here, so an asynchronous checkpoint takes little from training.
uint64_t checksum_of(const std::vector<std::string_view>& parts);
std::string read_file(const std::string& path,
                      const std::string& what);  // clear Error when missing

// A read-only memory map of a whole file.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path, const std::string& what);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const char* data() const { return data_; }
  size_t size() const { return size_; }
  // Drops the pages of [begin, begin + n) from memory (they are read again from the file if
  // touched): a map read once does not stay resident.
  void release(size_t begin, size_t n) const;

 private:
  const char* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace mxn
