// Package clog is a stand-in, written for this benchmark build, for the
// context-carried slog helpers that Telepresence 2 imports from
// github.com/telepresenceio/clog. The Go module proxy does not serve the
// version Telepresence pins, so this package offers the same exported names
// and signatures that Telepresence v2.27.4 calls, implemented on log/slog.
package clog

import (
	"context"
	"fmt"
	stdlog "log"
	"log/slog"
	"runtime"
	"time"
)

type ctxLoggerKey struct{}

// Logger returns the logger stored in ctx, or slog.Default() when there is none.
func Logger(ctx context.Context) *slog.Logger {
	if lg, ok := ctx.Value(ctxLoggerKey{}).(*slog.Logger); ok && lg != nil {
		return lg
	}
	return slog.Default()
}

// WithLogger returns a child of ctx that carries lg.
func WithLogger(ctx context.Context, lg *slog.Logger) context.Context {
	return context.WithValue(ctx, ctxLoggerKey{}, lg)
}

// With returns a child of ctx whose logger has the given key/value pairs added.
func With(ctx context.Context, args ...any) context.Context {
	if len(args) == 0 {
		return ctx
	}
	return WithLogger(ctx, Logger(ctx).With(args...))
}

// WithGroup returns a child of ctx whose logger opens the named group.
func WithGroup(ctx context.Context, name string) context.Context {
	if name == "" {
		return ctx
	}
	return WithLogger(ctx, Logger(ctx).WithGroup(name))
}

// Enabled tells whether the logger in ctx would emit a record at level.
func Enabled(ctx context.Context, level slog.Level) bool {
	return Logger(ctx).Enabled(ctx, level)
}

// callerPC returns the program counter of the function that called the
// exported logging function (skip counts: runtime.Callers, callerPC,
// emit*, the exported function).
func callerPC() uintptr {
	var pcs [1]uintptr
	runtime.Callers(4, pcs[:])
	return pcs[0]
}

func emitArgs(ctx context.Context, level slog.Level, args []any) {
	h := Logger(ctx).Handler()
	if len(args) == 0 || !h.Enabled(ctx, level) {
		return
	}
	msg, ok := args[0].(string)
	if !ok {
		msg = fmt.Sprint(args[0])
	}
	rec := slog.NewRecord(time.Now(), level, msg, callerPC())
	rec.Add(args[1:]...)
	_ = h.Handle(ctx, rec)
}

func emitf(ctx context.Context, level slog.Level, format string, args []any) {
	h := Logger(ctx).Handler()
	if !h.Enabled(ctx, level) {
		return
	}
	rec := slog.NewRecord(time.Now(), level, fmt.Sprintf(format, args...), callerPC())
	_ = h.Handle(ctx, rec)
}

func emitAttrs(ctx context.Context, level slog.Level, msg string, attrs []slog.Attr) {
	h := Logger(ctx).Handler()
	if !h.Enabled(ctx, level) {
		return
	}
	rec := slog.NewRecord(time.Now(), level, msg, callerPC())
	rec.AddAttrs(attrs...)
	_ = h.Handle(ctx, rec)
}

// Log logs at level; the first arg, made a string, is the message and the rest are key/value pairs.
func Log(ctx context.Context, level slog.Level, args ...any) { emitArgs(ctx, level, args) }

// Logf logs a fmt.Sprintf-formatted message at level.
func Logf(ctx context.Context, level slog.Level, format string, args ...any) {
	emitf(ctx, level, format, args)
}

// LogAttrs logs msg with attrs at level.
func LogAttrs(ctx context.Context, level slog.Level, msg string, attrs ...slog.Attr) {
	emitAttrs(ctx, level, msg, attrs)
}

func Trace(ctx context.Context, args ...any) { emitArgs(ctx, LevelTrace, args) }
func Tracef(ctx context.Context, format string, args ...any) {
	emitf(ctx, LevelTrace, format, args)
}
func TraceAttrs(ctx context.Context, msg string, attrs ...slog.Attr) {
	emitAttrs(ctx, LevelTrace, msg, attrs)
}

func Debug(ctx context.Context, args ...any) { emitArgs(ctx, slog.LevelDebug, args) }
func Debugf(ctx context.Context, format string, args ...any) {
	emitf(ctx, slog.LevelDebug, format, args)
}
func DebugAttrs(ctx context.Context, msg string, attrs ...slog.Attr) {
	emitAttrs(ctx, slog.LevelDebug, msg, attrs)
}

func Info(ctx context.Context, args ...any) { emitArgs(ctx, slog.LevelInfo, args) }
func Infof(ctx context.Context, format string, args ...any) {
	emitf(ctx, slog.LevelInfo, format, args)
}
func InfoAttrs(ctx context.Context, msg string, attrs ...slog.Attr) {
	emitAttrs(ctx, slog.LevelInfo, msg, attrs)
}

func Warn(ctx context.Context, args ...any) { emitArgs(ctx, slog.LevelWarn, args) }
func Warnf(ctx context.Context, format string, args ...any) {
	emitf(ctx, slog.LevelWarn, format, args)
}
func WarnAttrs(ctx context.Context, msg string, attrs ...slog.Attr) {
	emitAttrs(ctx, slog.LevelWarn, msg, attrs)
}

func Error(ctx context.Context, args ...any) { emitArgs(ctx, slog.LevelError, args) }
func Errorf(ctx context.Context, format string, args ...any) {
	emitf(ctx, slog.LevelError, format, args)
}
func ErrorAttrs(ctx context.Context, msg string, attrs ...slog.Attr) {
	emitAttrs(ctx, slog.LevelError, msg, attrs)
}

// lineWriter turns each Write into one log record at a fixed level.
type lineWriter struct {
	ctx   context.Context
	lg    *slog.Logger
	level slog.Level
}

func (w *lineWriter) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 && (p[len(p)-1] == '\n' || p[len(p)-1] == '\r') {
		p = p[:len(p)-1]
	}
	w.lg.Log(w.ctx, w.level, string(p))
	return n, nil
}

// StdLogger returns a standard library logger whose output is logged at level
// through the logger in ctx.
func StdLogger(ctx context.Context, level slog.Level) *stdlog.Logger {
	return stdlog.New(&lineWriter{ctx: ctx, lg: Logger(ctx), level: level}, "", 0)
}
