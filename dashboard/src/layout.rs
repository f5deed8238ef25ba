//! The frame every page shares: the head (stylesheet, script, theme), the navigation, who is
//! signed in and the sign-out form.

use maud::{DOCTYPE, Markup, html};

use crate::session::{Theme, Viewer};

/// The pages in the navigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Nav {
    Home,
    Traces,
    Analytics,
    Quotas,
    Policy,
    Sql,
    Manage,
    Account,
}

const NAV: [(Nav, &str, &str); 7] = [
    (Nav::Home, "/", "Home"),
    (Nav::Traces, "/traces", "Traces"),
    (Nav::Analytics, "/analytics", "Analytics"),
    (Nav::Quotas, "/quotas", "Quotas"),
    (Nav::Policy, "/policy", "Policy"),
    (Nav::Sql, "/sql", "SQL"),
    (Nav::Manage, "/manage", "Admin"),
];

/// A page for a signed-in viewer.
pub(crate) fn page(title: &str, viewer: &Viewer, current: Nav, main: Markup) -> Markup {
    let signed_in = &viewer.signed_in;
    // Admin is for those who may manage the organization.
    let manages = signed_in
        .role
        .allows(loom_schemas::roles::Permission::ManageTenant);
    shell(
        title,
        viewer.theme,
        html! {
            header.top {
                a.brand href="/" { "Loom" }
                nav aria-label="Pages" {
                    @for (nav, href, label) in NAV.into_iter().filter(|(nav, ..)| *nav != Nav::Manage || manages) {
                        a href=(href) aria-current=[(nav == current).then_some("page")] { (label) }
                    }
                }
                div.who {
                    button.theme type="button" data-theme-toggle title="Switch between light and dark" { "Theme" }
                    a.principal href="/account" title=(format!("{} ({}): your account", signed_in.principal, signed_in.role.name())) {
                        (signed_in.principal) " · " (signed_in.role.name())
                    }
                    form method="post" action="/signout" {
                        input type="hidden" name="token" value=(viewer.form_token());
                        button type="submit" { "Sign out" }
                    }
                }
            }
            main id="main" { (main) }
        },
    )
}

/// A page without a viewer (sign-in, registration, refusals).
pub(crate) fn bare(title: &str, theme: Theme, main: Markup) -> Markup {
    shell(
        title,
        theme,
        html! {
            main.narrow id="main" {
                p.brand { "Loom" }
                (main)
            }
        },
    )
}

fn shell(title: &str, theme: Theme, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" data-theme=[theme.attribute()] {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (title) " · Loom" }
                link rel="stylesheet" href="/assets/loom.css";
                script src="/assets/loom.js" defer {}
            }
            body { (body) }
        }
    }
}

/// `text` as one URL query component.
pub(crate) fn encode(text: &str) -> String {
    url::form_urlencoded::byte_serialize(text.as_bytes()).collect()
}
