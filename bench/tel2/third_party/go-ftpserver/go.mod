module github.com/telepresenceio/go-ftpserver

go 1.25

require (
	github.com/fclairamb/ftpserverlib v0.30.0
	github.com/spf13/afero v1.15.0
	github.com/telepresenceio/clog v0.0.0-20260114221933-287514cf9831
)
