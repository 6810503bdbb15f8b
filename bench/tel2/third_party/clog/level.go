package clog

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
)

// LevelTrace sits four steps below slog.LevelDebug.
const LevelTrace = slog.LevelDebug - 4

// LevelStrings names the accepted levels, least verbose first.
var LevelStrings = []string{"ERROR", "WARN", "INFO", "DEBUG", "TRACE"}

// LevelWithTrace is a slog.Level that also prints and parses "TRACE".
type LevelWithTrace slog.Level

func (l LevelWithTrace) String() string {
	lv := slog.Level(l)
	switch {
	case lv == LevelTrace:
		return "TRACE"
	case lv < slog.LevelDebug:
		return fmt.Sprintf("TRACE%+d", int(lv-LevelTrace))
	default:
		return lv.String()
	}
}

func (l LevelWithTrace) MarshalText() ([]byte, error) { return []byte(l.String()), nil }

func (l *LevelWithTrace) UnmarshalText(text []byte) error {
	if strings.EqualFold(strings.TrimSpace(string(text)), "trace") {
		*l = LevelWithTrace(LevelTrace)
		return nil
	}
	var lv slog.Level
	if err := lv.UnmarshalText(text); err != nil {
		return err
	}
	*l = LevelWithTrace(lv)
	return nil
}

// ParseLevel accepts trace, debug, info, warn or error in any letter case.
func ParseLevel(s string) (slog.Level, error) {
	var l LevelWithTrace
	err := l.UnmarshalText([]byte(s))
	return slog.Level(l), err
}

// MustParseLevel is ParseLevel that panics on a bad name.
func MustParseLevel(s string) slog.Level {
	lv, err := ParseLevel(s)
	if err != nil {
		panic(err)
	}
	return lv
}

type treeLevelKey struct{}

// WithTreeLevel stores a mutable level in a child of ctx; every context
// derived from it shares that level.
func WithTreeLevel(ctx context.Context, level slog.Level) context.Context {
	v := new(atomic.Int64)
	v.Store(int64(level))
	return context.WithValue(ctx, treeLevelKey{}, v)
}

// TreeEnabled reports whether level is at or above the tree level stored in
// ctx. Without a tree level nothing is enabled.
func TreeEnabled(ctx context.Context, level slog.Level) bool {
	if v, ok := ctx.Value(treeLevelKey{}).(*atomic.Int64); ok {
		return int64(level) >= v.Load()
	}
	return false
}

// SetTreeLevel changes the tree level stored in ctx (or an ancestor) and
// reports whether it changed.
func SetTreeLevel(ctx context.Context, level slog.Level) bool {
	v, ok := ctx.Value(treeLevelKey{}).(*atomic.Int64)
	if !ok {
		return false
	}
	return v.Swap(int64(level)) != int64(level)
}
