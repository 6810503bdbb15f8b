package clog_test

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"

	"github.com/telepresenceio/clog"
	"github.com/telepresenceio/clog/handler"
)

func newCtx(level slog.Level, buf *bytes.Buffer, opts ...handler.Option) context.Context {
	ctx := clog.WithTreeLevel(context.Background(), level)
	opts = append(opts, handler.Output(buf), handler.TimeFormat(""), handler.LevelEnabler(clog.TreeEnabled))
	return clog.WithLogger(ctx, slog.New(handler.NewText(opts...)))
}

func TestTreeLevel(t *testing.T) {
	var buf bytes.Buffer
	ctx := newCtx(slog.LevelInfo, &buf)
	clog.Debug(ctx, "hidden")
	clog.Infof(ctx, "shown %d", 1)
	if !clog.SetTreeLevel(ctx, clog.LevelTrace) {
		t.Fatal("SetTreeLevel reported no change")
	}
	clog.Tracef(context.WithoutCancel(ctx), "traced %s", "x")
	got := buf.String()
	if strings.Contains(got, "hidden") || !strings.Contains(got, "info   shown 1\n") {
		t.Fatalf("unexpected output %q", got)
	}
	if !strings.Contains(got, "trace  traced x (clog_test.go:") {
		t.Fatalf("trace line lacks level or source: %q", got)
	}
}

func TestGroupsAttrsAndHideLevel(t *testing.T) {
	var buf bytes.Buffer
	ctx := newCtx(slog.LevelDebug, &buf, handler.HideLevel(slog.LevelError))
	ctx = clog.WithGroup(clog.With(ctx, "k", "v w"), "daemon")
	clog.Error(ctx, "boom", "n", 2)
	clog.Warn(ctx, "careful")
	want := "daemon : boom k=\"v w\" daemon.n=2\nwarn   daemon : careful k=\"v w\"\n"
	if got := buf.String(); got != want {
		t.Fatalf("got %q, want %q", got, want)
	}
}

func TestLevels(t *testing.T) {
	for _, s := range []string{"trace", "DEBUG", "Info", "warn", "error"} {
		if _, err := clog.ParseLevel(s); err != nil {
			t.Errorf("ParseLevel(%q): %v", s, err)
		}
	}
	if _, err := clog.ParseLevel("loud"); err == nil {
		t.Error("ParseLevel accepted a bad name")
	}
	if s := clog.LevelWithTrace(clog.LevelTrace).String(); s != "TRACE" {
		t.Errorf("trace level prints as %q", s)
	}
	if s := clog.LevelWithTrace(slog.LevelWarn).String(); s != "WARN" {
		t.Errorf("warn level prints as %q", s)
	}
}

func TestStdLogger(t *testing.T) {
	var buf bytes.Buffer
	ctx := newCtx(slog.LevelInfo, &buf)
	clog.StdLogger(ctx, slog.LevelWarn).Print("from std")
	if got := buf.String(); got != "warn   from std\n" {
		t.Fatalf("got %q", got)
	}
}
