// Package server is the FTP server that Telepresence 2's traffic-agent starts
// to export a pod's volumes for FTP mounts on the client. Written for the
// benchmark build as a stand-in for github.com/telepresenceio/go-ftpserver
// v1.2.1, which the Go module proxy does not serve. It offers the same
// entry points (Start, StartOnPort) built on github.com/fclairamb/ftpserverlib
// and github.com/spf13/afero: anonymous access, rooted at a base directory,
// with symbolic links inside it resolved so that Kubernetes volume layouts
// (which are made of links) list as plain files and directories.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"

	ftp "github.com/fclairamb/ftpserverlib"
	"github.com/spf13/afero"

	"github.com/telepresenceio/clog"
)

// Start serves basePath over FTP on a port chosen by the system, sends that
// port on portCh (which it closes when it returns), and serves until ctx ends.
func Start(ctx context.Context, publicHost string, basePath string, portCh chan<- uint16) error {
	defer close(portCh)
	return serve(ctx, publicHost, basePath, 0, portCh)
}

// StartOnPort serves basePath over FTP on port until ctx ends.
func StartOnPort(ctx context.Context, publicHost string, basePath string, port uint16) error {
	return serve(ctx, publicHost, basePath, port, nil)
}

func serve(ctx context.Context, publicHost, basePath string, port uint16, portCh chan<- uint16) error {
	var lc net.ListenConfig
	l, err := lc.Listen(ctx, "tcp", fmt.Sprintf("0.0.0.0:%d", port))
	if err != nil {
		return err
	}
	addr := l.Addr().(*net.TCPAddr)
	d := &mainDriver{
		ctx:  ctx,
		root: basePath,
		settings: ftp.Settings{
			Listener:            l,
			ListenAddr:          addr.String(),
			PublicHost:          publicHost,
			Banner:              "Telepresence traffic-agent FTP",
			DefaultTransferType: ftp.TransferTypeBinary,
			EnableHASH:          true,
			IdleTimeout:         300,
		},
	}
	srv := ftp.NewFtpServer(d)
	srv.Logger = clog.Logger(ctx).With("component", "ftp")
	clog.Infof(ctx, "FTP server listening on %s", addr)
	if portCh != nil {
		select {
		case portCh <- uint16(addr.Port):
		case <-ctx.Done():
			_ = l.Close()
			return nil
		}
	}
	go func() {
		<-ctx.Done()
		_ = srv.Stop()
	}()
	err = srv.ListenAndServe()
	if ctx.Err() != nil {
		return nil
	}
	return err
}

type mainDriver struct {
	ctx      context.Context
	root     string
	settings ftp.Settings
}

func (d *mainDriver) GetSettings() (*ftp.Settings, error) { return &d.settings, nil }

func (d *mainDriver) GetTLSConfig() (*tls.Config, error) {
	return nil, errors.New("TLS is not offered")
}

func (d *mainDriver) ClientConnected(cc ftp.ClientContext) (string, error) {
	clog.Infof(d.ctx, "FTP client %d connected from %s", cc.ID(), cc.RemoteAddr())
	cc.SetDebug(clog.Enabled(d.ctx, slog.LevelDebug))
	return "Telepresence", nil
}

func (d *mainDriver) ClientDisconnected(cc ftp.ClientContext) {
	clog.Infof(d.ctx, "FTP client %d from %s disconnected", cc.ID(), cc.RemoteAddr())
}

// AuthUser lets every user in, anonymously, rooted at the base directory.
func (d *mainDriver) AuthUser(_ ftp.ClientContext, _, _ string) (ftp.ClientDriver, error) {
	return &clientDriver{Fs: afero.NewBasePathFs(linkFollowingFs{afero.NewOsFs()}, d.root), ctx: d.ctx}, nil
}

type clientDriver struct {
	afero.Fs
	ctx context.Context
}

// GetHandle opens a file for a transfer; an upload that creates the file
// without appending starts writing at offset, truncating what lies beyond.
func (c *clientDriver) GetHandle(name string, flags int, offset int64) (ftp.FileTransfer, error) {
	clog.Debugf(c.ctx, "FTP handle %s flags=%#x offset=%d", name, flags, offset)
	f, err := c.OpenFile(name, flags, 0o600)
	if err != nil {
		return nil, err
	}
	if flags&os.O_CREATE != 0 && flags&os.O_APPEND == 0 {
		if err = f.Truncate(offset); err != nil {
			_ = f.Close()
			return nil, err
		}
	}
	if offset > 0 {
		if _, err = f.Seek(offset, 0); err != nil {
			_ = f.Close()
			return nil, err
		}
	}
	return f, nil
}

// linkFollowingFs reports symbolic links as what they point to,
// both for single paths (Lstat) and in directory listings.
type linkFollowingFs struct {
	afero.Fs
}

func (l linkFollowingFs) LstatIfPossible(name string) (os.FileInfo, bool, error) {
	fi, err := l.Stat(name)
	return fi, false, err
}

func (l linkFollowingFs) Open(name string) (afero.File, error) {
	f, err := l.Fs.Open(name)
	if err != nil {
		return nil, err
	}
	return &linkFollowingDir{File: f, dir: name}, nil
}

type linkFollowingDir struct {
	afero.File
	dir string
}

func (d *linkFollowingDir) Readdir(n int) ([]os.FileInfo, error) {
	infos, err := d.File.Readdir(n)
	for i, fi := range infos {
		if fi.Mode()&os.ModeSymlink == 0 {
			continue
		}
		if target, serr := os.Stat(filepath.Join(d.dir, fi.Name())); serr == nil {
			infos[i] = namedInfo{FileInfo: target, name: fi.Name()}
		}
	}
	return infos, err
}

// namedInfo keeps the link's own name on its target's metadata.
type namedInfo struct {
	os.FileInfo
	name string
}

func (n namedInfo) Name() string { return n.name }
