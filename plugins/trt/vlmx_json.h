// A small JSON reader for the Triton cubin manifest (objects, arrays, strings, numbers, true/false/null).
// Header-only so the plugin library has no third-party dependency; errors carry the byte offset.
#ifndef VLMX_JSON_H_
#define VLMX_JSON_H_

#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace vlmx {
namespace json {

struct Value {
    enum class Type { kNull, kBool, kNumber, kString, kArray, kObject };
    Type type{Type::kNull};
    bool boolean{false};
    double number{0.0};
    std::string string;
    std::vector<Value> array;
    std::map<std::string, Value> object;

    bool has(std::string const& key) const { return type == Type::kObject && object.count(key) != 0; }
    Value const& at(std::string const& key) const {
        auto it = object.find(key);
        if (type != Type::kObject || it == object.end()) {
            throw std::runtime_error("missing key \"" + key + "\"");
        }
        return it->second;
    }
    std::string const& str() const {
        if (type != Type::kString) throw std::runtime_error("expected a string");
        return string;
    }
    long long integer() const {
        if (type != Type::kNumber) throw std::runtime_error("expected a number");
        return static_cast<long long>(number);
    }
};

class Parser {
public:
    explicit Parser(std::string const& text) : s_(text) {}

    Value parse() {
        Value v = value();
        skipSpace();
        if (pos_ != s_.size()) fail("trailing characters");
        return v;
    }

private:
    [[noreturn]] void fail(char const* what) const {
        throw std::runtime_error(std::string("JSON: ") + what + " at byte " + std::to_string(pos_));
    }
    void skipSpace() {
        while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\n' || s_[pos_] == '\r' || s_[pos_] == '\t')) {
            ++pos_;
        }
    }
    bool consume(char c) {
        skipSpace();
        if (pos_ < s_.size() && s_[pos_] == c) {
            ++pos_;
            return true;
        }
        return false;
    }
    void expect(char c) {
        if (!consume(c)) fail((std::string("expected '") + c + "'").c_str());
    }
    bool literal(char const* word) {
        std::string w(word);
        if (s_.compare(pos_, w.size(), w) == 0) {
            pos_ += w.size();
            return true;
        }
        return false;
    }
    std::string stringBody() {
        std::string out;
        while (pos_ < s_.size() && s_[pos_] != '"') {
            char c = s_[pos_++];
            if (c == '\\') {
                if (pos_ >= s_.size()) fail("unterminated escape");
                char e = s_[pos_++];
                switch (e) {
                case 'n': out += '\n'; break;
                case 't': out += '\t'; break;
                case 'r': out += '\r'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'u': {
                    if (pos_ + 4 > s_.size()) fail("short \\u escape");
                    unsigned code = static_cast<unsigned>(std::strtoul(s_.substr(pos_, 4).c_str(), nullptr, 16));
                    pos_ += 4;
                    out += code < 0x80 ? static_cast<char>(code) : '?';  // names and paths are ASCII
                    break;
                }
                default: out += e;
                }
            } else {
                out += c;
            }
        }
        if (pos_ >= s_.size()) fail("unterminated string");
        ++pos_;
        return out;
    }
    Value value() {
        skipSpace();
        if (pos_ >= s_.size()) fail("unexpected end");
        Value v;
        char c = s_[pos_];
        if (c == '{') {
            ++pos_;
            v.type = Value::Type::kObject;
            if (consume('}')) return v;
            do {
                skipSpace();
                expect('"');
                std::string key = stringBody();
                expect(':');
                v.object[key] = value();
            } while (consume(','));
            expect('}');
        } else if (c == '[') {
            ++pos_;
            v.type = Value::Type::kArray;
            if (consume(']')) return v;
            do {
                v.array.push_back(value());
            } while (consume(','));
            expect(']');
        } else if (c == '"') {
            ++pos_;
            v.type = Value::Type::kString;
            v.string = stringBody();
        } else if (literal("true")) {
            v.type = Value::Type::kBool;
            v.boolean = true;
        } else if (literal("false")) {
            v.type = Value::Type::kBool;
        } else if (literal("null")) {
            v.type = Value::Type::kNull;
        } else {
            char const* begin = s_.c_str() + pos_;
            char* end = nullptr;
            v.number = std::strtod(begin, &end);
            if (end == begin) fail("unexpected character");
            v.type = Value::Type::kNumber;
            pos_ += static_cast<size_t>(end - begin);
        }
        return v;
    }

    std::string const& s_;
    size_t pos_{0};
};

inline Value parse(std::string const& text) { return Parser(text).parse(); }

}  // namespace json
}  // namespace vlmx
#endif  // VLMX_JSON_H_
